"""API keys: created once, stored hashed (mode 0600), compared in constant time; 401/403/429 in OpenAI's shape."""

from __future__ import annotations

import hmac
import json
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_fake import FakeEngine, make_app

from hearth.cli.main import main
from hearth.governance import keys as keys_mod
from hearth.governance.keys import KeyStore, create_key, keys_path, list_keys, revoke_key
from hearth.governance.ratelimit import RateLimiter

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_openai_error(r, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    return body["error"]


@pytest.fixture
def client(home):
    with TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the keys file ----------------------------------------------------------------------------------------------------


def test_create_prints_the_key_once_and_stores_only_a_salted_hash(home, capsys):
    code, out, err = run_cli(capsys, "keys", "create", "--name", "laptop", "--rpm", "5", "--expires", "2099-01-01")
    assert code == 0
    key = out.strip()
    assert key.startswith("hk_") and len(out.splitlines()) == 1  # stdout: the key alone, for `$(hearth keys create)`
    assert "shown only this once" in err
    path = keys_path()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = Path(path).read_text()
    secret = key.split("_", 2)[2]
    assert secret not in text and key not in text
    (record,) = json.loads(text)["keys"]
    assert record["kdf"] == {"name": "scrypt", "n": 2**14, "r": 8, "p": 1}  # the real cost, not a test shortcut
    assert len(bytes.fromhex(record["salt"])) == 16 and len(bytes.fromhex(record["hash"])) == 32
    assert record["rpm"] == 5 and record["expires"] == "2099-01-01T00:00:00Z"
    # same secret, another key: a different salt, so a different hash
    _, other = create_key("twin")
    assert other.salt != record["salt"]
    assert KeyStore().verify(key).record.id == record["id"]


def test_list_and_revoke(home, capsys, fast_kdf):
    key, record = create_key("ci", scope="admin", tpm=1000)
    code, out, _ = run_cli(capsys, "keys", "list")
    assert code == 0 and record.id in out and "ci" in out and "admin" in out and "active" in out
    code, out, _ = run_cli(capsys, "keys", "list", "--json")
    (listed,) = json.loads(out)
    assert listed["id"] == record.id and "hash" not in listed and "salt" not in listed
    assert key not in out
    code, out, _ = run_cli(capsys, "keys", "revoke", "ci")
    assert code == 0 and record.id in out
    assert list_keys()[0].status == "revoked"
    code, _, err = run_cli(capsys, "keys", "revoke", "nobody")
    assert code == 1 and err.startswith("hearth: error: no key with id or name 'nobody'") and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--expires", "2001-01-01"], "in the past"),
    (["--expires", "next tuesday"], "cannot read the time"),
    (["--rpm", "0"], "--rpm must be at least 1"),
])  # fmt: skip
def test_create_refuses_bad_values(home, capsys, argv, needle):
    code, out, err = run_cli(capsys, "keys", "create", "--name", "x", *argv)
    assert code == 1 and out == "" and needle in err
    assert not os.path.exists(keys_path())


def test_concurrent_creates_lose_nothing(home, fast_kdf):
    threads = [threading.Thread(target=create_key, args=(f"k{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.name for r in list_keys()) == [f"k{i}" for i in range(8)]
    assert not [n for n in os.listdir(home) if n.endswith(".tmp")]  # atomic writes leave no temporary files


# --- the server -------------------------------------------------------------------------------------------------------


def test_no_keys_no_auth_then_a_key_locks_every_route_but_the_public_ones(client, home, fast_kdf):
    assert client.get("/v1/models").status_code == 200  # no keys yet: local use stays open
    key, _ = create_key("app")  # picked up by the running server: no restart
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("GET", "/metrics"), ("GET", "/v1/models/fake-model"), ("GET", "/docs"),
                         ("GET", "/nope")]:  # fmt: skip
        r = client.request(method, path, json=CHAT if method == "POST" else None)
        err = assert_openai_error(r, 401, "authentication_error")
        assert "missing API key" in err["message"] and err["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200
    for path in ("/", "/static/app.js", "/static/missing.css"):  # the web page asks for the key itself
        assert client.get(path).status_code in (200, 404)
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(key)).status_code == 200
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200


@pytest.mark.parametrize("header", ["Bearer hk_00000000_nope", "Bearer sk-not-ours", "Basic dXNlcjpwYXNz", "Bearer "])
def test_bad_keys_are_401(client, home, fast_kdf, header):
    key, record = create_key("app")
    wrong = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    for value in (header, f"Bearer {wrong}"):
        err = assert_openai_error(client.get("/v1/models", headers={"Authorization": value}), 401,
                                  "authentication_error")  # fmt: skip
        assert key not in err["message"]


def test_keys_are_compared_in_constant_time(client, home, fast_kdf, monkeypatch):
    key, _ = create_key("app")
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(keys_mod.hmac, "compare_digest", spy)
    assert client.get("/v1/models", headers=bearer(key[:-1] + "x")).status_code == 401
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert calls == [(32, 32), (32, 32)]


def test_revoked_and_expired_keys_are_refused(client, home, fast_kdf, monkeypatch):
    key, record = create_key("old", expires="2099-06-01")
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    later = datetime(2099, 6, 2, tzinfo=timezone.utc)
    with monkeypatch.context() as m:
        m.setattr(keys_mod, "utcnow", lambda: later)
        err = assert_openai_error(client.get("/v1/models", headers=bearer(key)), 401, "authentication_error")
        assert "expired" in err["message"]
    revoke_key(record.id)
    err = assert_openai_error(client.get("/v1/models", headers=bearer(key)), 401, "authentication_error")
    assert "revoked" in err["message"]
    # revoking the last key locks the server; it never opens it again
    assert client.get("/v1/models").status_code == 401


def test_require_key_with_no_keys_refuses_everything(home):
    with TestClient(make_app(FakeEngine(), keys=KeyStore(), require_key=True)) as c:
        assert_openai_error(c.get("/v1/models"), 401, "authentication_error")
        assert c.get("/health").status_code == 200


def test_admin_routes_refuse_chat_keys(client, home, fast_kdf):
    chat_key, record = create_key("chat")
    admin_key, _ = create_key("ops", scope="admin")
    err = assert_openai_error(client.get("/metrics", headers=bearer(chat_key)), 403, "permission_error")
    assert record.id in err["message"] and "admin" in err["message"]
    r = client.get("/metrics", headers=bearer(admin_key))
    assert r.status_code == 200 and "hearth_requests_total" in r.text
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(admin_key)).status_code == 200


def test_requests_per_minute(client, home, fast_kdf):
    key, record = create_key("slow", rpm=2)
    other, _ = create_key("other", rpm=2)
    assert [client.get("/v1/models", headers=bearer(key)).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models", headers=bearer(key))
    err = assert_openai_error(r, 429, "rate_limit_error")
    assert err["code"] == "rate_limit_exceeded" and "2 requests per minute" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert client.get("/v1/models", headers=bearer(other)).status_code == 200  # limits are per key


def test_tokens_per_minute(client, home, fast_kdf):
    key, _ = create_key("tokens", tpm=50)
    r = client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] > 50  # admitted, then charged
    r = client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    err = assert_openai_error(r, 429, "rate_limit_error")
    assert "50 tokens per minute" in err["message"] and int(r.headers["retry-after"]) >= 1


def test_rate_limiter_window():
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.admit("k", 2, None) is None and limiter.admit("k", 2, None) is None
    refusal = limiter.admit("k", 2, None)
    assert refusal is not None and refusal.retry_after == 60
    now[0] += 30
    assert limiter.admit("k", 2, None).retry_after == 30
    now[0] += 30.5
    assert limiter.admit("k", 2, None) is None
    limiter.charge("t", 120)
    assert limiter.admit("t", None, 100).retry_after == 60
    now[0] += 61
    assert limiter.admit("t", None, 100) is None


def test_the_key_never_reaches_logs_or_the_audit_log(home, fast_kdf, caplog):
    from hearth.governance.audit import AuditLog

    key, record = create_key("quiet")
    with caplog.at_level("DEBUG"), TestClient(make_app(FakeEngine(), keys=KeyStore(), audit=AuditLog())) as c:
        c.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        c.get("/v1/models", headers=bearer(key + "x"))
    secret = key.split("_", 2)[2]
    assert secret not in caplog.text
    for name in os.listdir(os.path.join(home, "audit")):
        assert secret not in Path(home, "audit", name).read_text(errors="replace")
    assert record.id in Path(home, "audit", "audit.jsonl").read_text()


def test_keys_file_mode_survives_a_wide_umask(home, fast_kdf):
    old = os.umask(0)
    try:
        create_key("a")
        revoke_key("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(keys_path()).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_keys_list_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from hearth.cli.main import main; main(['keys', 'list']); assert 'torch' not in sys.modules"
    env = {**os.environ, "HEARTH_HOME": "/nonexistent-hearth-home"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
