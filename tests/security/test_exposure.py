"""Exposure and input safety: no open non-loopback bind, CORS off by default, sandboxed chat templates, pickle refused,
bounded readers for corrupt safetensors, request body and prompt size limits."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from test_api_fake import FakeEngine, FakeTokenizer, make_app

from hearth.api.app import create_app
from hearth.chat.template import ChatTemplate
from hearth.cli.main import main
from hearth.governance.keys import KeyStore, create_key
from hearth.loader import ModelLoadError

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if `hearth serve` gets as far as loading a model or starting uvicorn."""
    import uvicorn

    import hearth.cli.serve as serve

    def refuse(*args, **kwargs):
        raise AssertionError("the server should not have started")

    monkeypatch.setattr(serve, "build_app", refuse)
    monkeypatch.setattr(uvicorn, "Server", refuse)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "my-laptop.lan"])
def test_non_loopback_bind_without_keys_refuses_to_start(home, no_model_load, capsys, host):
    assert main(["serve", "--host", host]) == 1
    err = capsys.readouterr().err
    assert f"refusing to listen on {host} without API keys" in err
    assert "--insecure-no-auth" in err and "hearth keys create" in err and "Traceback" not in err


def test_require_key_without_keys_refuses_to_start(home, no_model_load, capsys):
    assert main(["serve", "--require-key"]) == 1
    assert "holds no active key" in capsys.readouterr().err


@pytest.fixture
def started(monkeypatch, home) -> list:
    """`hearth serve` up to uvicorn's loop, which is replaced by a recorder."""
    import uvicorn

    import hearth.cli.serve as serve

    runs: list = []

    class Server:
        def __init__(self, config) -> None:
            self.config, self.should_exit = config, False

        def run(self) -> None:
            runs.append((self.config.host, self.config.app))

    engine = FakeEngine()
    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(serve, "build_app", lambda *a, **kw: (make_app(engine, **{k: kw[k] for k in (
        "keys", "audit", "require_key", "cors_origins")}), engine))  # fmt: skip
    return runs


def test_keys_are_a_reason_to_bind_non_loopback(started, capsys, fast_kdf):
    key, _ = create_key("lan")
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "API keys: required" in out and "Authorization: Bearer" in out
    ((host, app),) = started
    with TestClient(app) as c:  # the app it would serve enforces the key
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_insecure_no_auth_starts_with_a_warning(started, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "WITHOUT authentication" in err
    assert started[0][0] == "0.0.0.0"


def preflight(client, origin: str):
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    headers["Access-Control-Request-Headers"] = "authorization"
    return client.options("/v1/chat/completions", headers=headers)


def test_cors_is_off_by_default():
    with TestClient(make_app(FakeEngine())) as c:
        r = preflight(c, "https://evil.example")
        assert "access-control-allow-origin" not in r.headers and r.status_code >= 400
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_only_for_listed_origins(home, fast_kdf):
    create_key("web")
    app = make_app(FakeEngine(), keys=KeyStore(), cors_origins=["http://localhost:3000"])
    with TestClient(app) as c:
        r = preflight(c, "http://localhost:3000")  # a preflight carries no key: answered before auth
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in preflight(c, "https://evil.example").headers
        r = c.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


ESCAPES = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].system('id') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace(_x=1) %}{{ ns }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ (messages|first).items.__self__.__class__ }}",
    "{{ lipsum.__globals__['os'] }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_template_reaching_python_internals_fails_cleanly_and_the_server_stays_up(source):
    template = ChatTemplate(source + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    engine = FakeEngine()
    with TestClient(create_app(engine, FakeTokenizer(), template, "fake-model")) as c:
        for _ in range(2):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["message"].startswith("chat template") and error["param"] == "messages"
            assert "uid=" not in r.text
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi"}).status_code == 200
    assert engine.calls == [engine.calls[0]]  # only the plain completion reached the engine


def test_pickle_checkpoints_are_refused(tmp_path):
    from hearth.loader.resolve import resolve_model
    from hearth.loader.safetensors import safetensors_files

    for name in ("model.bin", "model.pt", "model.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04K\x01.")  # a valid pickle
        with pytest.raises(ModelLoadError, match="pickle"):
            resolve_model(str(tmp_path / name))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError, match="pickle"):
        safetensors_files(str(folder))


@pytest.mark.parametrize("data", [
    b"",
    b"\x01\x02",
    struct.pack("<Q", 2**63) + b"{}",  # absurd header length
    struct.pack("<Q", 10**9) + b"{" + b" " * 64,  # header length past the end
    struct.pack("<Q", 64) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4000000000]}}',  # offsets past end
    struct.pack("<Q", 72) + b'{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}',
    struct.pack("<Q", 8) + b"not json",
])  # fmt: skip
def test_corrupt_safetensors_fail_cleanly_without_big_allocations(tmp_path, data):
    from hearth.loader.safetensors import iter_safetensors

    (tmp_path / "model.safetensors").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError):
            list(iter_safetensors(str(tmp_path)))
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()


def test_request_body_and_prompt_size_limits():
    with TestClient(make_app(FakeEngine(max_model_len=64), max_body_bytes=4096)) as c:
        big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        long = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 500}]}
        r = c.post("/v1/chat/completions", json=long)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
