"""The offline guard: non-loopback connections and name lookups are refused in-process before any packet leaves,
naming the caller; loopback works; `--allow-network` lifts it; `serve` and `run` install it and `serve` says so.

No test here sends traffic off the machine: the only outside address used is TEST-NET-1 (192.0.2.1, RFC 5737), and a
spy under the guard proves the real connect is never reached.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api_fake import FakeEngine, make_app

from hearth.cli.main import main
from hearth.governance.offline import (
    NO_TELEMETRY_ENV,
    OFFLINE_ENV,
    OfflineError,
    current_guard,
    install_offline_guard,
    is_local_host,
)

OUTSIDE = ("192.0.2.1", 80)  # TEST-NET-1: documentation only, never routed


@pytest.fixture
def spy(monkeypatch) -> list:
    """Replace the real socket operations with recorders that never touch the network; the guard wraps these."""
    calls: list = []

    def fake(name):
        def record(*args, **kwargs):
            calls.append((name, args))
            raise AssertionError(f"{name} reached the real socket layer")

        return record

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, fake(name))
    monkeypatch.setattr(socket, "create_connection", fake("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", fake("getaddrinfo"))
    return calls


@pytest.fixture
def guard(monkeypatch):
    for name in {**OFFLINE_ENV, **NO_TELEMETRY_ENV}:
        monkeypatch.delenv(name, raising=False)
    g = install_offline_guard()
    yield g
    g.uninstall()


def attempt_from_a_named_function():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.connect(OUTSIDE)


def test_outside_connections_are_refused_before_any_packet(spy, guard, caplog):
    with caplog.at_level("WARNING", logger="hearth.governance.offline"), pytest.raises(OfflineError) as e:
        attempt_from_a_named_function()
    message = str(e.value)
    assert "192.0.2.1:80" in message and "attempt_from_a_named_function" in message and "test_offline.py" in message
    assert "--allow-network" in message
    assert isinstance(e.value, OSError) and e.value.errno is not None  # network code handles it as a network error
    assert "attempt_from_a_named_function" in caplog.text and "192.0.2.1" in caplog.text
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OfflineError):
        s.connect_ex(OUTSIDE)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, pytest.raises(OfflineError):
        s.connect(("2001:db8::1", 443, 0, 0))  # IPv6 documentation prefix
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OfflineError):
        s.sendto(b"x", OUTSIDE)
    with pytest.raises(OfflineError):
        socket.create_connection(OUTSIDE, timeout=5)
    with pytest.raises(OfflineError, match="name lookup"):
        socket.getaddrinfo("huggingface.co", 443)  # a DNS query would leave the machine
    with pytest.raises(OfflineError):
        socket.socket().connect(("huggingface.co", 443))  # connect resolves names itself
    assert spy == []
    assert [target for target, _ in guard.blocked][:2] == ["192.0.2.1:80", "192.0.2.1:80"]


def test_http_clients_fail_fast(guard):
    start = time.perf_counter()
    with pytest.raises(httpx.ConnectError, match="offline"):
        httpx.get("http://192.0.2.1/", timeout=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get("https://huggingface.co/api/models", timeout=30)

    async def open_outside():
        await asyncio.open_connection(*OUTSIDE)

    with pytest.raises(OSError, match="offline"):
        asyncio.run(open_outside())
    assert time.perf_counter() - start < 5


def test_loopback_and_unix_sockets_pass(guard, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with socket.create_connection(("localhost", port), timeout=5):
            pass
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0
    assert socket.getaddrinfo("localhost", 80)
    assert socket.getaddrinfo("192.0.2.1", 80)  # a numeric address resolves without a packet (binding needs it)
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    assert guard.blocked == []


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
                                         ("localhost", True), ("LOCALHOST.", True), ("::ffff:127.0.0.1", True),
                                         ("10.0.0.1", False), ("0.0.0.0", False), ("192.0.2.1", False),
                                         ("example.com", False), ("127.0.0.1.nip.io", False)])  # fmt: skip
def test_is_local_host(host, local):
    assert is_local_host(host) is local


def test_env_is_set_and_restored(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    original = socket.socket.connect
    g = install_offline_guard()
    try:
        assert install_offline_guard() is g  # idempotent
        for name, value in {**OFFLINE_ENV, **NO_TELEMETRY_ENV}.items():
            assert os.environ[name] == value
        assert socket.socket.connect is not original
    finally:
        g.uninstall()
    assert socket.socket.connect is original and current_guard() is None
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "DO_NOT_TRACK" not in os.environ


def test_allow_network_lifts_the_guard_but_keeps_telemetry_off(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    original = socket.socket.connect
    g = install_offline_guard(allow_network=True)
    try:
        assert socket.socket.connect is original and socket.getaddrinfo is not None
        assert os.environ["DO_NOT_TRACK"] == "1" and "HF_HUB_OFFLINE" not in os.environ
    finally:
        g.uninstall()


class ReachingEngine(FakeEngine):
    """An engine whose code tries to phone home mid-request, catches the failure and answers anyway."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[OSError] = []

    async def generate(self, prompt_ids, params, request_id):
        try:
            socket.create_connection(OUTSIDE, timeout=30)
        except OSError as e:
            self.errors.append(e)
        async for delta in super().generate(prompt_ids, params, request_id):
            yield delta


def test_a_request_completes_while_its_code_is_refused_the_network(guard):
    engine = ReachingEngine()
    with TestClient(make_app(engine)) as c:
        start = time.perf_counter()
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user", "content": "?"}]})
        elapsed = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello world! This is hearth."
    assert elapsed < 5  # refused at once, not after a 30 s connect timeout
    (error,) = engine.errors
    assert isinstance(error, OfflineError) and "test_offline.generate" in error.caller


class FakeServer:
    runs: list = []

    def __init__(self, config) -> None:
        self.config = config
        self.should_exit = False

    def run(self) -> None:
        guard = current_guard()
        blocking = guard is not None and not guard.allow_network
        if blocking:  # never attempted without the guard: no packet may leave
            with pytest.raises(OfflineError):
                socket.create_connection(OUTSIDE)
        FakeServer.runs.append((self.config.host, blocking))


@pytest.fixture
def fake_serve(monkeypatch, home):
    """`hearth serve` with the app, the engine and uvicorn's loop replaced: everything up to `server.run()` is real."""
    import uvicorn

    import hearth.cli.serve as serve

    FakeServer.runs = []
    engine = FakeEngine()
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(serve, "build_app", lambda *a, **kw: (make_app(engine, keys=kw.get("keys")), engine))
    return FakeServer.runs


def test_serve_installs_the_guard_and_says_it_is_offline(fake_serve, capsys):
    assert main(["serve", "smollm2", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    assert "Offline: outbound connections are refused" in out
    assert fake_serve == [("127.0.0.1", True)]
    assert current_guard() is None  # removed again when the server stops


def test_serve_allow_network(fake_serve, capsys):
    assert main(["serve", "smollm2", "--allow-network"]) == 0
    assert "outbound connections allowed" in capsys.readouterr().out
    assert fake_serve == [("127.0.0.1", False)]


def test_run_installs_the_guard(monkeypatch):
    import hearth.cli.run as run

    seen = []
    monkeypatch.setattr(run, "_run", lambda args: seen.append(current_guard() is not None) or 0)
    assert main(["run", "smollm2", "hi"]) == 0
    assert seen == [True] and current_guard() is None
