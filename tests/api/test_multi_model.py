"""One server, several models (hearth/api/models.py): each loads on the first request naming it, requests to two models
run at once, keep-alive and LRU unload, a load that fails or takes too long answers a clear error, unknown names 404.

The models are tiny random Llama checkpoints (tests/conftest.py `save_tiny`), loaded by the real engine; the server is
the real app under TestClient (its lifespan runs the keep-alive reaper), or under uvicorn for `hearth ps`.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import shutil
import socket
import threading
import time
import weakref

import pytest
import torch
from conftest import save_tiny
from fastapi.testclient import TestClient

from hearth.api.app import create_app
from hearth.api.models import FOREVER, LocalModels, ModelRegistry, parse_keep_alive
from hearth.config import EngineConfig

ENGINE_CONFIG = EngineConfig(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64, dtype="float32")
NAMES = ("tiny-a", "tiny-b", "tiny-c")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
        out[name] = save_tiny(LlamaForCausalLM(config).eval(), str(tmp_path_factory.mktemp(name)))
    broken = tmp_path_factory.mktemp("broken")  # a config the loader reads, weights it cannot
    shutil.copy(os.path.join(out["tiny-a"], "config.json"), broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    out["broken"] = str(broken)
    return out


class Folders(LocalModels):
    """LocalModels over fixed folders (served name → folder), counting loads; `gate` (when set) holds loads back."""

    def __init__(self, folders: dict[str, str]) -> None:
        super().__init__(ENGINE_CONFIG, "cpu")
        self.folders = folders
        self.loads: list[str] = []
        self.gate: threading.Event | None = None

    def catalog(self) -> dict[str, str]:
        return dict(self.folders)

    def load(self, ref, name):
        self.loads.append(name)
        if self.gate is not None:
            assert self.gate.wait(30)
        return super().load(ref, name)


def complete(client, model: str, **extra) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0,
                                             **extra})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def ps_names(client) -> list[str]:
    return sorted(m["name"] for m in client.get("/api/ps").json()["models"])


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def live_tensor_bytes() -> int:
    """Bytes held by the storages of every live tensor in the process (each storage once)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def serve(source, **registry_kwargs) -> TestClient:
    return TestClient(create_app(None, None, None, None, models=ModelRegistry(source, **registry_kwargs)))


def test_parse_keep_alive():
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0 and parse_keep_alive(30) == 30 and parse_keep_alive(1.5) == 1.5
    assert parse_keep_alive("10m") == 600 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive("90s") == 90
    assert parse_keep_alive("300") == 300 and parse_keep_alive("500ms") == 0.5
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1") == FOREVER and parse_keep_alive("-5m") == FOREVER
    for bad in ["", "ten minutes", "10x", "m", True, [1]]:
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_two_models_by_name_concurrently(tiny_models):
    source = Folders({n: tiny_models[n] for n in ("tiny-a", "tiny-b")})
    with serve(source) as c:
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert set(cards) == {"tiny-a", "tiny-b"} and not any(m["loaded"] for m in cards.values())
        assert c.get("/api/ps").json() == {"models": []}
        assert c.get("/health").json() == {"status": "ready", "models": []}
        # one request each, at the same time: each model loads and answers under its own name
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda n: complete(c, n), ["tiny-a", "tiny-b"])
        assert a["model"] == "tiny-a" and b["model"] == "tiny-b"
        assert a["usage"]["completion_tokens"] == 4 and b["usage"]["completion_tokens"] == 4
        assert ps_names(c) == ["tiny-a", "tiny-b"]
        registry = c.app.state.models
        engines = [registry.entry(n).state.engine for n in ("tiny-a", "tiny-b")]
        assert engines[0] is not engines[1] and engines[0]._thread is not engines[1]._thread
        assert all(e._thread.is_alive() for e in engines)
        # the same greedy request gives the same text again (the model stayed loaded: no second load)
        assert complete(c, "tiny-a")["choices"][0]["text"] == a["choices"][0]["text"]
        assert sorted(source.loads) == ["tiny-a", "tiny-b"]
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert cards["tiny-a"]["loaded"] is True and cards["tiny-a"]["max_model_len"] == 128
        # streams to both models at once: each answers under its own name
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            chats = list(pool.map(lambda n: c.post("/v1/chat/completions", json={
                "model": n, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}),
                ["tiny-a", "tiny-b"]))  # fmt: skip
        for r, n in zip(chats, ["tiny-a", "tiny-b"]):
            assert r.status_code == 200 and f'"model":"{n}"' in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_unknown_model_is_404_in_openai_shape(tiny_models):
    with serve(Folders({"tiny-a": tiny_models["tiny-a"]})) as c:
        r = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
        assert c.get("/v1/models/nope").status_code == 404
        assert c.get("/v1/models/tiny-a").json() == {**c.get("/v1/models/tiny-a").json(), "id": "tiny-a",
                                                      "loaded": False}  # fmt: skip
        # with no default model, a request must name one
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/completions", json={"model": "tiny-a", "prompt": "hi", "keep_alive": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
        assert ps_names(c) == []  # nothing was loaded by refused requests


def test_keep_alive_zero_unloads_and_frees_memory(tiny_models):
    source = Folders({"tiny-a": tiny_models["tiny-a"]})
    with serve(source) as c:
        registry = c.app.state.models
        baseline = live_tensor_bytes()
        complete(c, "tiny-a", keep_alive="10m")
        entry = registry.entry("tiny-a")
        engine_ref = weakref.ref(entry.state.engine.engine)  # the LLMEngine behind the AsyncEngine
        loaded = live_tensor_bytes()
        assert loaded - baseline >= entry.size // 2 > 0  # the weights and KV cache the registry accounted for
        ps = c.get("/api/ps").json()["models"]
        assert ps[0]["name"] == "tiny-a" and ps[0]["processor"] == "cpu" and ps[0]["size"] == entry.size
        assert 590 < ps[0]["expires_at"] - time.time() <= 600
        complete(c, "tiny-a", keep_alive=0)  # unloads once answered
        wait_for(lambda: ps_names(c) == [])
        wait_for(lambda: engine_ref() is None)
        after = live_tensor_bytes()
        assert loaded - after >= entry.size // 2, (baseline, loaded, after)
        # named again, it loads again
        complete(c, "tiny-a")
        assert source.loads == ["tiny-a", "tiny-a"] and ps_names(c) == ["tiny-a"]


def test_server_keep_alive_expires_idle_models(tiny_models):
    with serve(Folders({"tiny-a": tiny_models["tiny-a"], "tiny-b": tiny_models["tiny-b"]}), keep_alive=1.0) as c:
        complete(c, "tiny-a")
        complete(c, "tiny-b", keep_alive=-1)  # this one stays
        assert c.get("/api/ps").json()["models"][0]["expires_at"] is None  # tiny-b, most recent, forever
        wait_for(lambda: ps_names(c) == ["tiny-b"], timeout=10)
        time.sleep(1.2)
        assert ps_names(c) == ["tiny-b"]


def test_lru_unload_under_a_small_budget(tiny_models):
    source = Folders({n: tiny_models[n] for n in NAMES})
    one = source.estimate(tiny_models["tiny-a"])
    with serve(source, budget_bytes=int(2.5 * one)) as c:
        complete(c, "tiny-a")
        complete(c, "tiny-b")
        complete(c, "tiny-a")  # now tiny-b is the least recently used
        assert ps_names(c) == ["tiny-a", "tiny-b"]
        complete(c, "tiny-c")  # three do not fit: tiny-b goes
        assert ps_names(c) == ["tiny-a", "tiny-c"]
        assert c.app.state.models.used_bytes() <= int(2.5 * one)
    # a model larger than the whole budget is refused with a clear 400, and nothing is unloaded for it
    with serve(Folders({"tiny-a": tiny_models["tiny-a"]}), budget_bytes=one // 2) as c:
        r = c.post("/v1/completions", json={"model": "tiny-a", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_load_failed"
        assert "memory budget" in r.json()["error"]["message"]


def test_requests_during_a_load_wait_for_it(tiny_models):
    source = Folders({"tiny-a": tiny_models["tiny-a"]})
    source.gate = threading.Event()
    with serve(source) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, c, "tiny-a") for _ in range(4)]
        wait_for(lambda: source.loads == ["tiny-a"])
        time.sleep(0.3)
        assert not any(f.done() for f in futures)  # all waiting on the one load
        assert c.get("/health").status_code == 200  # the server answers meanwhile
        source.gate.set()
        results = [f.result(timeout=60) for f in futures]
        assert all(r["usage"]["completion_tokens"] == 4 for r in results)
        assert source.loads == ["tiny-a"]


def test_a_slow_load_is_503_not_a_hang(tiny_models):
    source = Folders({"tiny-a": tiny_models["tiny-a"]})
    source.gate = threading.Event()
    registry = ModelRegistry(source, load_timeout=0.5)
    with TestClient(create_app(None, None, None, None, models=registry)) as c:
        start = time.monotonic()
        r = c.post("/v1/completions", json={"model": "tiny-a", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert "still loading" in r.json()["error"]["message"] and time.monotonic() - start < 10
        registry.load_timeout = 60.0  # the rest of the load may take longer than 0.5 s on a busy machine
        source.gate.set()  # the load goes on; a later request gets the model
        complete(c, "tiny-a")
        assert source.loads == ["tiny-a"]


def test_a_failed_load_is_a_4xx_and_the_others_keep_serving(tiny_models):
    source = Folders({"tiny-a": tiny_models["tiny-a"], "broken": tiny_models["broken"]})
    with serve(source) as c:
        complete(c, "tiny-a")
        r = c.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "model_load_failed" and "broken" in r.json()["error"]["message"]
        complete(c, "tiny-a")
        assert ps_names(c) == ["tiny-a"]
        r = c.post("/v1/completions", json={"model": "broken", "prompt": "hi"})  # tried again, fails again
        assert r.status_code == 400
        assert source.loads.count("broken") == 2


def test_default_model_with_the_stores(tiny_models):
    """`hearth serve MODEL`: MODEL is preloaded, answers requests without a model, never expires; the stores too."""
    source = Folders({"tiny-b": tiny_models["tiny-b"]})
    preloaded = Folders({})
    engine, tokenizer, template = preloaded.load(tiny_models["tiny-a"], "tiny-a")
    app = create_app(engine, tokenizer, template, "tiny-a", models=ModelRegistry(source, keep_alive=0.0))
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ready", "model": "tiny-a"}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-a", "tiny-b"]
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny-a"
        complete(c, "tiny-b")
        wait_for(lambda: ps_names(c) == ["tiny-a"])  # keep-alive 0 unloads tiny-b, never the default
        complete(c, "tiny-a", keep_alive=0)
        time.sleep(0.3)
        assert ps_names(c) == ["tiny-a"] and c.get("/api/ps").json()["models"][0]["expires_at"] is None


def test_local_models_catalog(tiny_models, tmp_path, monkeypatch):
    """The models `hearth list` shows are the ones served: a folder under $HEARTH_HOME/models by its name."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(tiny_models["tiny-a"], home / "models" / "my-tiny")
    monkeypatch.setenv("HEARTH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HOME", str(tmp_path))
    catalog = LocalModels(ENGINE_CONFIG).catalog()
    assert catalog["my-tiny"] == str(home / "models" / "my-tiny")
    with serve(LocalModels(ENGINE_CONFIG)) as c:
        assert "my-tiny" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert complete(c, "my-tiny")["model"] == "my-tiny"


def test_hearth_ps(tiny_models, capsys):
    import uvicorn

    from hearth.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(None, None, None, None, models=ModelRegistry(Folders({"tiny-a": tiny_models["tiny-a"]})))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        assert main(["ps", "--port", str(port)]) == 0
        assert capsys.readouterr().out.strip().splitlines() == [
            f"{'NAME':<30} {'SIZE':>10}  {'PROCESSOR':<10} {'STATE':<8} UNTIL"]  # fmt: skip
        import httpx

        httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": "tiny-a", "prompt": "hi", "max_tokens": 1}).raise_for_status()  # fmt: skip
        assert main(["ps", "--port", str(port)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and lines[1].split()[0] == "tiny-a"
        assert "cpu" in lines[1] and "ready" in lines[1] and "minutes from now" in lines[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert main(["ps", "--port", str(port)]) == 1  # no server: a one-line error
    assert "no server at" in capsys.readouterr().err


def test_a_model_in_use_is_not_unloaded(tiny_models):
    """A streaming response holds its model (LeaseMiddleware) until the last byte is sent: LRU under a one-model budget
    must not take it, so the other model's load waits and then answers 503; once the stream ends it loads."""
    import asyncio
    import json

    import httpx

    source = Folders({n: tiny_models[n] for n in ("tiny-a", "tiny-b")})
    one = source.estimate(tiny_models["tiny-a"])
    registry = ModelRegistry(source, budget_bytes=int(1.5 * one), load_timeout=1.0)
    app = create_app(None, None, None, None, models=registry)

    async def scenario() -> None:
        await registry.start()
        held, first_chunk = asyncio.Event(), asyncio.Event()
        body = json.dumps({"model": "tiny-a", "prompt": "hello", "max_tokens": 8, "stream": True}).encode()
        received = False

        async def receive():
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never leaves

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()
                await held.wait()  # a slow reader: the response stays in flight

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http"}  # fmt: skip
        stream = asyncio.create_task(app(scope, receive, send))
        try:
            await asyncio.wait_for(first_chunk.wait(), 60)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
                r = await c.post("/v1/completions", json={"model": "tiny-b", "prompt": "hi", "max_tokens": 1})
                assert r.status_code == 503 and "no memory" in r.json()["error"]["message"], r.text
                assert [e.name for e in registry.loaded()] == ["tiny-a"] and registry.entry("tiny-a").leases == 1
                held.set()
                await asyncio.wait_for(stream, 60)
                # the lease is gone: tiny-b's load, still waiting for memory, may already have unloaded tiny-a (which
                # it can only do once nothing holds it)
                entry = registry.entry("tiny-a")
                assert entry is None or entry.leases == 0
                # unloading tiny-a and loading tiny-b took 1.8 s on a busy machine: the 1 s bound was only for the 503
                registry.load_timeout = 60.0
                r = await c.post("/v1/completions", json={"model": "tiny-b", "prompt": "hi", "max_tokens": 1})
                assert r.status_code == 200, r.text
                assert [e.name for e in registry.loaded()] == ["tiny-b"]  # tiny-a made room once it was free
        finally:
            held.set()
            stream.cancel()
            await registry.shutdown()

    asyncio.run(scenario())


def test_serve_command_builds_the_registry(monkeypatch, capsys):
    """`hearth serve`'s flags reach the registry: no model serves the stores; --only serves one model alone."""
    import uvicorn

    from hearth.cli.main import main

    apps = []

    class FakeServer:
        def __init__(self, config) -> None:
            apps.append(config.app)

        def run(self, sockets=None) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    assert main(["serve", "--keep-alive", "10m", "--max-memory", "2GiB", "--load-timeout", "7", "--port", "0"]) == 0
    registry = apps[-1].state.models
    assert isinstance(registry.source, LocalModels) and registry.default is None
    assert (registry.keep_alive, registry.budget_bytes, registry.load_timeout) == (600, 2 << 30, 7)
    assert "serving the local models" in capsys.readouterr().out
    assert main(["serve", "--only", "--port", "0"]) == 0  # the old single-model server: smollm2 alone
    registry = apps[-1].state.models
    assert registry.source is None and registry.default == "smollm2"
    for flags, needle in [(["--keep-alive", "soon"], "--keep-alive"), (["--max-memory", "lots"], "--max-memory")]:
        assert main(["serve", *flags, "--port", "0"]) == 1
        assert needle in capsys.readouterr().err
