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


# --- the keys file breaks while serving: the server stays closed ------------------------------------------------------

# every route that needs a key: the API, the admin route, the docs, an unknown path
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/models/fake-model"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("GET", "/nope")]  # fmt: skip
COMPLETION = {"model": "fake-model", "prompt": "Hi"}
ERROR_TYPE = {401: "authentication_error", 503: "service_unavailable"}


def call(c, method: str, path: str, headers: dict | None = None):
    body = (CHAT if path.endswith("/chat/completions") else COMPLETION) if method == "POST" else None
    return c.request(method, path, json=body, headers=headers)


def assert_closed(c, key: str, allowed: tuple[int, ...] = (401, 503)) -> set[int]:
    """Every protected route refuses, with the key and without, in OpenAI's error shape; returns the statuses."""
    seen = set()
    for method, path in PROTECTED:
        for headers in (None, bearer(key)):
            r = call(c, method, path, headers)
            assert r.status_code in allowed, (method, path, r.status_code, r.text)
            assert_openai_error(r, r.status_code, ERROR_TYPE[r.status_code])
            assert key.split("_", 2)[2] not in r.text
            seen.add(r.status_code)
    return seen


def assert_open_to(c, key: str) -> None:
    for method, path in PROTECTED:
        assert call(c, method, path, bearer(key)).status_code == (404 if path == "/nope" else 200), path
        assert call(c, method, path).status_code == 401


def replace_file(path: str, data: bytes) -> None:
    tmp = path + ".new"
    Path(tmp).write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


BAD_FIELD_VALUES = {
    "id": [None, 1, "", "1234567", "123456789", "zzzzzzzz", [], {}],
    "name": [None, 1, [], {"a": 1}],
    "scope": [None, "", "root", 1, ["chat"]],
    "salt": [None, "", "zz", 1, []],
    "hash": [None, "", "not hex", 1, {}],
    "kdf": [None, {}, "scrypt", [], {"name": "bcrypt", "n": 1024, "r": 8, "p": 1},
            {"name": "scrypt", "n": "1024", "r": 8, "p": 1}, {"name": "scrypt", "n": 1000, "r": 8, "p": 1},
            {"name": "scrypt", "n": 2**30, "r": 8, "p": 1}, {"name": "scrypt", "n": 1024, "r": 8}],
    "created": [1, [], {}],
    "expires": ["soon", 1, [], "2099-13-45"],
    "rpm": ["5", 0, -1, True, 1.5, [], {}],
    "tpm": ["5", 0, -1, False, 2.5, [], {}],
    "revoked": [1, True, [], {}],
}  # fmt: skip


def corruptions(valid: bytes) -> list[tuple[str, bytes | None]]:
    """(label, new content; None: remove the file), generated from a valid keys file holding one key."""
    import random

    rng = random.Random(1234)
    data = json.loads(valid)
    (record,) = data["keys"]
    out: list[tuple[str, bytes | None]] = [("removed", None), ("emptied", b""), ("no keys", b'{"version": 1, "keys": []}')]
    end = len(valid.rstrip())
    out += [(f"truncated to {n}", valid[:n]) for n in range(1, end, max(1, end // 20))]
    out += [(f"random bytes {n}", rng.randbytes(n)) for n in (1, 7, 64, len(valid), 4096)]
    structural = [i for i, b in enumerate(valid) if chr(b) in '{}[]":,']
    for n in (1, 2, 5, 20):  # bit flips in the JSON's structure: never valid JSON
        flipped = bytearray(valid)
        for i in rng.sample(structural, n):
            flipped[i] ^= 1 << rng.randrange(8)
        out.append((f"{n} bit flips", bytes(flipped)))
    out += [("NULs", b"\0" * 100), ("invalid UTF-8", b'{"keys": ["\xff\xfe"]}'), ("deep nesting", b"[" * 100_000)]
    shapes = [[], {}, None, 1, "keys", [data], {"keys": None}, {"keys": {}}, {"keys": "x"}, {"keys": [1]},
              {"keys": [None]}, {"keys": [[]]}, {"keys": [record, record]}, {"version": 1}]  # fmt: skip
    out += [(f"shape {json.dumps(v)[:40]}", json.dumps(v).encode()) for v in shapes]
    for field, values in BAD_FIELD_VALUES.items():
        for value in values:
            out.append((f"{field}={value!r}", json.dumps({**data, "keys": [{**record, field: value}]}).encode()))
    for field in ("id", "salt", "hash", "scope", "name"):
        rest = {k: v for k, v in record.items() if k != field}
        out.append((f"no {field}", json.dumps({**data, "keys": [rest]}).encode()))
    out.append(("unknown field", json.dumps({**data, "keys": [{**record, "admin": True}]}).encode()))
    return out


def test_a_broken_keys_file_keeps_every_route_closed_and_the_server_recovers(home, fast_kdf, caplog):
    key, record = create_key("app", scope="admin")
    path = keys_path()
    valid = Path(path).read_bytes()
    cases = corruptions(valid)
    assert len(cases) > 100
    with caplog.at_level("DEBUG"), TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:
        assert_open_to(c, key)
        for label, content in cases:
            if content is None:
                os.unlink(path)
            else:
                replace_file(path, content)
            seen = assert_closed(c, key)
            expected = {401} if label in ("removed", "no keys") else {503}
            assert seen == expected, label
            replace_file(path, valid)
            assert c.get("/v1/models", headers=bearer(key)).status_code == 200, f"no recovery after {label}"
        assert key.split("_", 2)[2] not in caplog.text and "usable again" in caplog.text


def test_random_keys_files_keep_the_server_closed(home, fast_kdf):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    key, _ = create_key("app", scope="admin")
    path = keys_path()
    valid = Path(path).read_bytes()
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4),
                               max_leaves=20)  # fmt: skip
    fields = st.sampled_from(sorted(keys_mod.KeyRecord.__dataclass_fields__))
    records = st.lists(st.dictionaries(fields, json_values, max_size=12), max_size=3)
    keys_like = st.fixed_dictionaries({"version": st.just(1), "keys": records})
    contents = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) | \
        keys_like.map(lambda v: json.dumps(v).encode())  # fmt: skip

    with TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(contents)
        def check(content: bytes) -> None:
            replace_file(path, content)
            assert_closed(c, key)
            replace_file(path, valid)
            assert c.get("/v1/models", headers=bearer(key)).status_code == 200

        check()


def test_an_unreadable_keys_file_is_503_and_logged_once(home, fast_kdf, caplog, monkeypatch):
    key, _ = create_key("app", scope="admin")
    path = keys_path()
    valid = Path(path).read_bytes()
    with caplog.at_level("DEBUG"), TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:
        # replaced by a directory
        os.unlink(path)
        os.mkdir(path)
        assert assert_closed(c, key) == {503}
        os.rmdir(path)
        replace_file(path, valid)
        assert_open_to(c, key)
        # open() fails (tests run as root, so chmod 000 would not stop them)
        caplog.clear()

        def unreadable(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(keys_mod, "open", unreadable, raising=False)
        replace_file(path, valid)  # a change, so the server rereads it
        for _ in range(3):
            assert assert_closed(c, key) == {503}
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "cannot read the keys file" in errors[0].getMessage()
        assert "Permission denied" in errors[0].getMessage()
        monkeypatch.undo()
        replace_file(path, valid)
        assert_open_to(c, key)
        assert "usable again" in caplog.text
        assert key.split("_", 2)[2] not in caplog.text


def test_each_change_is_logged_once_never_per_request(home, fast_kdf, caplog):
    key, _ = create_key("app", scope="admin")
    path = keys_path()
    valid = Path(path).read_bytes()
    with caplog.at_level("WARNING"), TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:
        caplog.clear()
        replace_file(path, b"garbage")
        for _ in range(5):
            assert_closed(c, key)
        os.unlink(path)
        for _ in range(5):
            assert_closed(c, key)
        replace_file(path, valid)
        for _ in range(5):
            assert c.get("/v1/models", headers=bearer(key)).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "hearth.governance.keys"]
    assert len(messages) == 3, messages
    assert "not a valid keys file" in messages[0] and "(503)" in messages[0]
    assert "is gone" in messages[1] and "(401)" in messages[1]
    assert "usable again" in messages[2]
    assert not any("garbage" in m for m in messages)  # the file's bytes are never logged


def test_a_server_started_open_locks_when_a_keys_file_appears_and_stays_locked(client, home, fast_kdf):
    assert client.get("/v1/models").status_code == 200  # no keys: open on loopback
    os.makedirs(home, exist_ok=True)
    replace_file(keys_path(), b"{not json")  # a file it cannot read locks it too: it might hold keys
    assert assert_closed(client, "hk_00000000_x") == {503}
    os.unlink(keys_path())
    assert assert_closed(client, "hk_00000000_x") == {401}  # and it stays locked until a restart
    key, _ = create_key("app", scope="admin")
    assert_open_to(client, key)


def test_require_key_stays_closed_whatever_the_file(home, fast_kdf):
    with TestClient(make_app(FakeEngine(), keys=KeyStore(), require_key=True)) as c:
        assert assert_closed(c, "hk_00000000_x") == {401}
        os.makedirs(home, exist_ok=True)
        replace_file(keys_path(), b"\x00\x01")
        assert assert_closed(c, "hk_00000000_x") == {503}
        os.unlink(keys_path())
        key, _ = create_key("app", scope="admin")
        assert_open_to(c, key)


def test_a_check_that_fails_unexpectedly_refuses(client, home, fast_kdf, monkeypatch):
    key, _ = create_key("app", scope="admin")

    def broken(self, key):
        raise RuntimeError("boom")

    monkeypatch.setattr(KeyStore, "verify", broken)
    assert assert_closed(client, key) == {401, 503}  # 401 without a key
    for method, path in PROTECTED:
        assert_openai_error(call(client, method, path, bearer(key)), 503, "service_unavailable")


def test_serve_refuses_to_start_on_a_broken_keys_file(home, capsys):
    os.makedirs(home, exist_ok=True)
    Path(keys_path()).write_text('{"keys": [{"id": 5}]}')
    code, _, err = run_cli(capsys, "serve", "smollm2")
    assert code == 1 and "not a valid keys file" in err and "Traceback" not in err


# --- tokens per minute: reserved at admission, settled at the end -----------------------------------------------------


def completion(c, key: str, prompt: str = "Hi", **fields):
    return c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt, **fields}, headers=bearer(key))


def test_tokens_per_minute(client, home, fast_kdf):
    key, record = create_key("tokens", tpm=50)
    # "Hi" is 3 prompt tokens (BOS + 2); no max_tokens: granted the 47 left, uses 28 (the fake reply), releases 19
    r = completion(client, key)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 31
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    # the 19 left: 3 for the prompt, 16 granted as max_tokens, so the reply stops at the limit
    r = completion(client, key)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 19
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = completion(client, key)
    err = assert_openai_error(r, 429, "rate_limit_error")
    assert "50 tokens per minute" in err["message"] and err["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200  # makes no tokens: not limited


def test_a_request_that_can_never_fit_says_so(client, home, fast_kdf):
    key, _ = create_key("tokens", tpm=50)
    err = assert_openai_error(completion(client, key, max_tokens=48), 429, "rate_limit_error")  # 3 + 48 > 50
    assert "request too large" in err["message"] and "max_tokens" in err["message"]
    err = assert_openai_error(client.post("/v1/chat/completions", json=CHAT, headers=bearer(key)), 429,
                              "rate_limit_error")  # fmt: skip
    assert "request too large" in err["message"]  # the ChatML prompt alone is 52 tokens
    assert completion(client, key, max_tokens=47).status_code == 200  # nothing was reserved by the refusals


def test_unused_reservations_are_released(client, home, fast_kdf):
    key, _ = create_key("tokens", tpm=50)
    r = completion(client, key, max_tokens=40)  # reserves 43, uses 3 + 28
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 31
    assert completion(client, key, max_tokens=17).status_code == 429  # 3 + 17 > 19 left
    r = completion(client, key, max_tokens=16, stop=["world"])  # reserves 19, uses 3 + 11
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 14
    assert completion(client, key, max_tokens=3).status_code == 429  # 5 left
    assert completion(client, key, max_tokens=2).status_code == 200


def test_failed_requests_release_their_reservation(home, fast_kdf):
    from hearth.engine.protocol import EngineError

    key, _ = create_key("tokens", tpm=50)
    engine = FakeEngine()
    with TestClient(make_app(engine, keys=KeyStore())) as c:
        engine.error = EngineError("the engine is not ready", 503)
        for _ in range(5):
            assert completion(c, key, max_tokens=47).status_code == 503  # each reserved all 50, then released them
        engine.error = None
        engine.mid_stream_error = EngineError("boom", 500)
        with c.stream("POST", "/v1/completions", headers=bearer(key),
                      json={"prompt": "Hi", "max_tokens": 40, "stream": True}) as r:  # fmt: skip
            assert r.status_code == 200 and "boom" in r.read().decode()  # used 3 + 3
        engine.mid_stream_error = None
        assert completion(c, key, max_tokens=42).status_code == 429
        assert completion(c, key, max_tokens=41).status_code == 200  # 44 were left


def test_a_client_that_leaves_early_is_charged_its_prompt_only(home, fast_kdf):
    import anyio

    key, _ = create_key("tokens", tpm=50)
    engine = FakeEngine(delay=0.2)
    app = make_app(engine, keys=KeyStore())
    body = json.dumps({"prompt": "Hi", "max_tokens": 40}).encode()
    sent = []

    async def leave_early() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await anyio.sleep(0.05)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 5555),
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"authorization", f"Bearer {key}".encode())]}  # fmt: skip
        await app(scope, receive, send)

    with TestClient(app) as c:
        anyio.run(leave_early)
        assert sent[0]["status"] == 499 and engine.aborted
        engine.delay = 0.0
        assert completion(c, key, max_tokens=45).status_code == 429  # 3 + 45 > 47 left
        assert completion(c, key, max_tokens=44).status_code == 200


def served_tokens(responses) -> int:
    total = 0
    for r in responses:
        if r.status_code != 200:
            continue
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            (usage,) = [e["usage"] for e in events if e.get("usage")]
        else:
            usage = r.json()["usage"]
        total += usage["total_tokens"]
    return total


@pytest.mark.parametrize("num", [10, 20])
def test_concurrent_requests_stay_within_the_token_limit(home, fast_kdf, num):
    import asyncio

    import httpx

    key, _ = create_key("tokens", tpm=50)
    engine = FakeEngine(delay=0.002)  # the requests overlap
    app = make_app(engine, keys=KeyStore())

    def body(i: int) -> tuple[str, dict]:
        kind = i % 5
        if kind == 0:
            return "/v1/completions", {"prompt": "Hi"}  # no max_tokens: granted what is left
        if kind == 1:
            return "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "n": 2}
        if kind == 2:
            return "/v1/completions", {"prompt": ["Hi", "Yo"], "max_tokens": 4, "stream": True,
                                       "stream_options": {"include_usage": True}}  # fmt: skip
        if kind == 3:
            return "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}
        return "/v1/completions", {"prompt": "Hello", "max_tokens": 10}

    async def drive(wave: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await asyncio.gather(*(c.post(path, json=b, headers=bearer(key))
                                          for path, b in map(body, range(wave, wave + num))))  # fmt: skip

    responses = []
    for wave in range(3):  # within one window: each wave finds what the ones before it left
        responses += asyncio.run(drive(wave))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    assert statuses.count(200) >= 2 and statuses.count(429) >= num
    for r in responses:
        if r.status_code == 429:
            assert_openai_error(r, 429, "rate_limit_error")
            assert int(r.headers["retry-after"]) >= 1
    assert 0 < served_tokens(responses) <= 50


def test_token_limits_are_reserved_by_the_routes_after_one_tokenization(home, fast_kdf):
    key, _ = create_key("tokens", tpm=50)
    roomy, _ = create_key("roomy", tpm=200)
    engine = FakeEngine()
    app = make_app(engine, keys=KeyStore())
    tokenizer = app.state.hearth.tokenizer
    encoded = []
    encode = tokenizer.encode
    tokenizer.encode = lambda text, **kw: encoded.append(text) or encode(text, **kw)
    with TestClient(app) as c:
        # 2 prompts of 3 tokens, n=2, no max_tokens: 4 completions share the 44 left, 11 each
        r = completion(c, key, prompt=["Hi", "Yo"], n=2)
        assert r.status_code == 200, r.text
        assert encoded == ["Hi", "Yo"]  # each prompt tokenized once, by the route
        assert [params.max_tokens for _, params, _ in engine.calls] == [11] * 4
        assert r.json()["usage"]["total_tokens"] == 50
        assert {ch["finish_reason"] for ch in r.json()["choices"]} == {"length"}
        calls = len(engine.calls)
        r = completion(c, key, max_tokens=1)
        assert r.status_code == 429 and len(engine.calls) == calls  # refused before reaching the engine
        # chat: the ChatML prompt is 52 tokens; without max_completion_tokens it is granted the 148 left
        r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(roomy))
        assert r.status_code == 200 and engine.calls[-1][1].max_tokens == 148
        r = c.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 7}, headers=bearer(roomy))
        assert r.status_code == 200 and engine.calls[-1][1].max_tokens == 7  # the request's own is kept


def test_a_granted_max_tokens_is_capped_by_the_context_left_after_the_longest_prompt(home, fast_kdf):
    key, _ = create_key("roomy", tpm=1000)
    engine = FakeEngine(max_model_len=20)
    with TestClient(make_app(engine, keys=KeyStore())) as c:
        # prompts of 3 and 6 tokens: the key has room for far more, the context for 20 - 6 = 14 per completion
        r = completion(c, key, prompt=["Hi", "Hello"])
        assert r.status_code == 200, r.text
        assert [params.max_tokens for _, params, _ in engine.calls] == [14, 14]
        calls = len(engine.calls)
        r = completion(c, key, prompt=["Hi", "x" * 19])  # 20 tokens: the length check refuses before any reservation
        assert assert_openai_error(r, 400, "invalid_request_error")["code"] == "context_length_exceeded"
        assert len(engine.calls) == calls
        r = completion(c, key, prompt="Hi", max_tokens=17)  # and what it did not reserve is still there
        assert r.status_code == 200 and engine.calls[-1][1].max_tokens == 17


def test_the_token_hook_reserves_once_and_not_after_its_request():
    from hearth.governance.middleware import TokenHook
    from hearth.governance.ratelimit import TokenAsk, TokenLimitExceeded

    limiter = RateLimiter()
    hook = TokenHook(limiter, "k", 100)
    with pytest.raises(TokenLimitExceeded) as refused:
        hook(TokenAsk(10, 1, 91, 500))
    assert "request too large" in refused.value.message and refused.value.retry_after == 60
    assert hook.reservation is None  # a refusal holds nothing
    assert hook(TokenAsk(10, 1, None, 500)) == 90 and hook.reservation.tokens == 100
    with pytest.raises(RuntimeError):
        hook(TokenAsk(1, 1, 1, 500))
    limiter.settle(hook.reservation, 0)
    late = TokenHook(limiter, "k", 100)
    late.closed = True  # the middleware closes it when the request ends
    with pytest.raises(RuntimeError):
        late(TokenAsk(1, 1, 1, 500))
    assert limiter.reserve("k", 100, TokenAsk(0, 1, 100, 500)).tokens == 100  # nothing was left held


def test_governance_does_not_import_the_api_package():
    import subprocess
    import sys

    code = ("import sys, hearth.governance.middleware; "
            "assert not [m for m in sys.modules if m == 'hearth.api' or m.startswith('hearth.api.')]")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    "message, status, code",
    [("missing API key", 401, None), ("bad key \u00e9\ud800", 401, "invalid_api_key"),
     ("needs an admin key", 403, "insufficient_scope"), ("slow down", 429, "rate_limit_exceeded"),
     ("internal server error", 500, None), ("keys unavailable", 503, "keys_unavailable")],
)  # fmt: skip
def test_governance_refusals_carry_the_api_error_body(message, status, code):
    from hearth.api.errors import error_response as api_error
    from hearth.governance.errors import error_response as governance_error

    ours = governance_error(message, status, code=code, headers={"WWW-Authenticate": "Bearer"})
    theirs = api_error(message, status, code=code)
    assert ours.status_code == status
    assert json.loads(ours.body) == json.loads(theirs.body)
    assert ours.body.isascii() and ours.headers["www-authenticate"] == "Bearer"
    assert ours.headers["content-type"] == "application/json"


def test_rate_limiter_window():
    from hearth.governance.ratelimit import Refusal, Reservation, TokenAsk

    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.admit("k", 2) is None and limiter.admit("k", 2) is None
    refusal = limiter.admit("k", 2)
    assert isinstance(refusal, Refusal) and refusal.retry_after == 60
    now[0] += 30
    assert limiter.admit("k", 2).retry_after == 30
    now[0] += 30.5
    assert limiter.admit("k", 2) is None
    assert all(limiter.admit("k", None) is None for _ in range(10))  # no rpm: never counted nor refused

    # tokens: reserved by the route, settled at the end
    a = limiter.reserve("t", 100, TokenAsk(10, 2, 20, 500))  # 10 + 2 × 20
    assert isinstance(a, Reservation) and a.tokens == 50 and a.max_tokens == 20
    b = limiter.reserve("t", 100, TokenAsk(10, 1, None, 500))  # no max_tokens: granted the 40 left after its prompt
    assert b.tokens == 50 and b.max_tokens == 40
    refusal = limiter.reserve("t", 100, TokenAsk(1, 1, 1, 500))
    assert isinstance(refusal, Refusal) and refusal.retry_after == 1  # only requests in flight stand in the way
    limiter.settle(a, 30)
    limiter.settle(a, 30)  # twice is once
    now[0] += 10
    limiter.settle(b, 50)
    c = limiter.reserve("t", 100, TokenAsk(5, 1, 15, 500))  # 20 left
    assert c.tokens == 20
    limiter.settle(c, 0)  # failed: nothing used
    refusal = limiter.reserve("t", 100, TokenAsk(5, 1, 20, 500))  # 25 > 20 left; frees when `a`'s 30 go
    assert refusal.retry_after == 50 and "has 20 left" in refusal.message
    d = limiter.reserve("t", 100, TokenAsk(5, 1, None, 3))  # a grant is capped by the context's room
    assert d.max_tokens == 3 and d.tokens == 8
    limiter.settle(d, 8)
    too_big = limiter.reserve("t", 100, TokenAsk(60, 1, 41, 500))
    assert "request too large" in too_big.message
    now[0] += 61
    assert limiter.reserve("t", 100, TokenAsk(60, 1, 40, 500)).tokens == 100  # the window has passed


def test_a_granted_max_tokens_is_not_in_the_transcript_and_big_bodies_are_413(home, fast_kdf):
    from hearth.governance.audit import AuditLog, read_transcript

    key, _ = create_key("tokens", tpm=50)
    with TestClient(make_app(FakeEngine(), keys=KeyStore(), audit=AuditLog(transcripts=True),
                             max_body_bytes=1024)) as c:  # fmt: skip
        r = completion(c, key, max_tokens=None)  # JSON null: no max_tokens, so one is granted
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 31
        request = read_transcript(r.json()["id"])["request"]
        assert json.loads(request) == {"model": "fake-model", "prompt": "Hi", "max_tokens": None}  # as sent
        err = assert_openai_error(completion(c, key, prompt="x" * 2000), 413, "invalid_request_error")
        assert "1024 bytes" in err["message"]
        # a body the route refuses reserves nothing and gets the route's own error
        r = c.post("/v1/completions", content=b"{not json", headers={**bearer(key), "Content-Type": "application/json"})
        assert_openai_error(r, 400, "invalid_request_error")
        assert_openai_error(completion(c, key, model="other"), 404, "invalid_request_error")
        assert completion(c, key, max_tokens=16).status_code == 200  # the 19 left were untouched
