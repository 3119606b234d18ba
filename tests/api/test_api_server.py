"""End to end: `hearth serve`'s app under a real uvicorn on 127.0.0.1, the real engine on the embedded SmolLM2,
driven by the official `openai` client (raw httpx where the client would hide the wire). One server for the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from hearth.config import EngineConfig

MODEL = "smollm2"
MAX_MODEL_LEN = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app, engine, url: str, while_loading: dict) -> None:
        self.app, self.engine, self.url, self.while_loading = app, engine, url, while_loading


@contextlib.contextmanager
def serve_smollm2(**build_kwargs):
    """`hearth serve smollm2`'s app (max_model_len 512, 4 sequences) on a free port, on one torch thread unless
    HEARTH_NUM_THREADS says otherwise; yields its URL once /health answers 200, and stops it afterwards. For the
    modules that drive one server with their own client (test_messages, test_responses)."""
    import uvicorn

    from hearth.cli.serve import build_app
    from hearth.loader.resolve import resolve_model

    num_threads = torch.get_num_threads()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HEARTH_NUM_THREADS", os.environ.get("HEARTH_NUM_THREADS", "1"))
    app, _ = build_app(resolve_model(MODEL), EngineConfig(max_model_len=512, max_num_seqs=4), **build_kwargs)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{uv.config.port}"
    deadline = time.time() + 240
    try:
        while True:
            assert time.time() < deadline and thread.is_alive(), "server did not become ready"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=15)
        monkeypatch.undo()
        torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from hearth.cli.serve import build_app
    from hearth.loader.resolve import resolve_model

    # one torch thread unless told otherwise: on a small shared CPU, more threads than free cores decode many times
    # slower; the setting is process-wide, so it is put back afterwards
    num_threads = torch.get_num_threads()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HEARTH_NUM_THREADS", os.environ.get("HEARTH_NUM_THREADS", "1"))
    # small queue limits, so the 429 test can fill them; the disconnect test stays under them
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_waiting=8)
    app, engine = build_app(resolve_model(MODEL), config)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while_loading: dict = {}
    deadline = time.time() + 240
    with httpx.Client(base_url=url, timeout=30) as c:
        while True:
            assert time.time() < deadline and thread.is_alive(), "server did not become ready"
            try:
                health = c.get("/health")
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if health.status_code == 200:
                break
            if not while_loading:  # the model loads in the background: the server already answers 503
                while_loading["health"] = (health.status_code, health.json())
                r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
                while_loading["chat"] = (r.status_code, r.json())
            time.sleep(0.2)
    yield Server(app, engine, url, while_loading)
    uv.should_exit = True
    thread.join(timeout=15)
    monkeypatch.undo()
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_loading_then_ready(server):
    if not server.while_loading:
        pytest.skip("the model loaded before the first poll")
    status, body = server.while_loading["health"]
    assert status == 503 and body["status"] == "loading"
    status, body = server.while_loading["chat"]
    assert status == 503 and body["error"]["code"] == "not_ready"
    assert httpx.get(server.url + "/health").json() == {"status": "ready", "model": MODEL}


def test_the_app_and_the_engine_share_one_tokenizer(server):
    async_engine = server.engine._engine  # LoadingEngine -> the loaded AsyncEngine
    assert async_engine.engine.tokenizer is server.app.state.hearth.tokenizer


def test_models(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.owned_by == "hearth" and model.max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_stream_and_not_agree(client):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    text = out.choices[0].message.content
    assert text and out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_completions_stream_and_not_agree_and_echo(client):
    prompt = "The three primary colors are"
    out = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10)
    text = out.choices[0].text
    assert text and out.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, echo=True)
    assert echoed.choices[0].text == prompt + text


def test_n2_and_seed_reproducibility(client):
    def sample(seed: int, n: int = 1) -> list[str]:
        out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=1.0, max_tokens=10, seed=seed,
                                             n=n)  # fmt: skip
        assert [c.index for c in out.choices] == list(range(n))
        return [c.message.content for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    pair = sample(1234, n=2)
    assert len(pair) == 2 and pair[0] == first[0]  # choice i samples with seed + i
    assert pair[1] == sample(1235)[0]
    others = {sample(seed)[0] for seed in (1, 2, 3)}
    assert others != {first[0]}


def test_stop_string_spanning_tokens(client):
    prompt = "Once upon a time, there was a"
    out = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, logprobs=0)
    text, tokens = out.choices[0].text, out.choices[0].logprobs.tokens
    assert "".join(tokens) == text
    # a stop string made of the end of one token and the start of the next
    offset, stop = 0, None
    for a, b in zip(tokens, tokens[1:]):
        offset += len(a)
        candidate = a[-2:] + b[:2]
        if len(a) >= 2 and len(b) >= 2 and text.find(candidate) == offset - 2:
            stop = candidate
            break
    assert stop is not None, tokens
    expected = text[: text.find(stop)]
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=stop,
                                            stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_logprobs_shapes(client):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
                                         top_logprobs=3)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
    done = client.completions.create(model=MODEL, prompt="Paris is", temperature=0, max_tokens=5, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 600, max_tokens=4)
    message = e.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and "601" in message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature="hot")  # type: ignore[arg-type]
    assert e.value.body["param"] == "temperature"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
        r = c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices[0].message.content


def test_extreme_sampling_values_fail_alone(server):
    """The values that used to kill the engine thread or fail every request in flight: each one is a 400 or a normal
    answer, the requests sent alongside answer normally, and the server stays ready."""
    greedy = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    extremes = [{"seed": 2**64}, {"seed": -(2**63) - 1}, {"seed": 10**30}, {"temperature": 1e-300},
                {"temperature": 5e-324}, {"top_p": 1e-300}, {"top_p": 5e-324}, {"top_p": 1e-40},
                {"repetition_penalty": 1e-300}, {"repetition_penalty": 5e-324}, {"repetition_penalty": 1e-40}]  # fmt: skip

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            bodies = [greedy] + [{**greedy, "temperature": 0.8, **extreme} for extreme in extremes] + [greedy]
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for body in bodies))

    first, *answers, last = asyncio.run(burst())
    for extreme, r in zip(extremes, answers):
        refused = "seed" in extreme or "repetition_penalty" in extreme
        assert r.status_code == (400 if refused else 200), (extreme, r.text)
        if refused:
            assert r.json()["error"]["param"] == next(iter(extreme))
    for r in (first, last):  # bf16 batches may round differently from a lone request: no token comparison here
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert httpx.get(server.url + "/health").status_code == 200


def test_queue_full_is_429(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(64)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    wait_idle(server)


def wait_idle(server, timeout: float = 30.0):
    deadline = time.time() + timeout
    while True:
        stats = server.engine.stats
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0:
            return stats
        assert time.time() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def test_disconnects_free_everything(server, client):
    body = {"model": MODEL, "messages": QUESTION, "stream": True, "max_tokens": 200}

    async def wave(c: httpx.AsyncClient, size: int) -> None:
        async def one() -> None:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    break  # the first chunk arrived; leaving the block closes the connection mid-stream

        await asyncio.gather(*(one() for _ in range(size)))

    async def run() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # a closed stream must close its socket
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            for _ in range(10):
                await wave(c, 5)

    asyncio.run(run())
    stats = wait_idle(server)
    assert stats.num_kvcache_blocks > 0
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert out.choices[0].message.content
    metrics = httpx.get(server.url + "/metrics").text
    assert 'hearth_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "hearth_num_requests_running 0.0" in metrics and "hearth_kv_cache_usage_ratio 0.0" in metrics
