"""The audit log: one hash-chained record per request, durable and safe under concurrency; `hearth audit verify`
names the first broken record after an edit, removal, insertion or reordering; no text unless transcripts are on."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api_fake import FakeEngine, make_app

from hearth.cli.main import main
from hearth.governance.audit import (
    FIELDS,
    AuditLog,
    canonical,
    read_records,
    read_transcript,
    record_hash,
    verify_log,
)
from hearth.governance.keys import KeyStore, create_key

SECRET_PROMPT = "my bank password is hunter2"
NUM_CONCURRENT = 200


def chat_body(i: int, **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": f"{SECRET_PROMPT} #{i}"}], **extra}


def log_path(home: str) -> str:
    return os.path.join(home, "audit", "audit.jsonl")


def lines(home: str) -> list[bytes]:
    with open(log_path(home), "rb") as f:
        return f.read().splitlines(keepends=True)


def write_lines(home: str, new: list[bytes]) -> None:
    with open(log_path(home), "wb") as f:
        f.writelines(new)


def run_verify(capsys) -> tuple[int, str]:
    code = main(["audit", "verify"])
    return code, capsys.readouterr().out


def test_200_concurrent_requests_then_verify(home, fast_kdf, capsys):
    key, record = create_key("load")
    audit = AuditLog()
    engine = FakeEngine(delay=0.001)
    app = make_app(engine, keys=KeyStore(), audit=audit)

    async def drive() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            auth = {"Authorization": f"Bearer {key}"}

            def one(i: int):
                if i % 10 == 9:
                    return c.get("/v1/models")  # no key: 401, audited too
                if i % 4 == 1:
                    return c.post("/v1/chat/completions", json=chat_body(i, stream=True), headers=auth)
                if i % 4 == 2:
                    body = {"model": "fake-model", "prompt": f"{SECRET_PROMPT} {i}", "max_tokens": 5}
                    return c.post("/v1/completions", json=body, headers=auth)
                return c.post("/v1/chat/completions", json=chat_body(i), headers=auth)

            return await asyncio.gather(*(one(i) for i in range(NUM_CONCURRENT)))

    responses = asyncio.run(drive())
    statuses = [r.status_code for r in responses]
    assert statuses.count(401) == NUM_CONCURRENT // 10 and statuses.count(200) == NUM_CONCURRENT * 9 // 10

    code, out = run_verify(capsys)
    assert code == 0, out
    assert f"ok: {NUM_CONCURRENT} records" in out
    records = list(read_records())
    assert [r["seq"] for r in records] == list(range(1, NUM_CONCURRENT + 1))
    assert all(list(r) == sorted(FIELDS) for r in records)
    assert len({r["request_id"] for r in records}) == NUM_CONCURRENT
    assert all(r["time"].endswith("Z") and r["client"] == "127.0.0.1" for r in records)
    by_id = {r["request_id"]: r for r in records}
    for r in responses:  # the non-streaming responses' ids and usage match their audit records
        if r.status_code == 200 and r.headers["content-type"].startswith("application/json"):
            body = r.json()
            rec = by_id[body["id"]]
            assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cached_tokens"]) == (
                body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"],
                body["usage"]["prompt_tokens_details"]["cached_tokens"])  # fmt: skip
            assert rec["key_id"] == record.id and rec["status"] == 200 and rec["model"] == "fake-model"
            assert rec["finish_reason"] in ("stop", "length") and rec["latency_ms"] > 0
    chat = [r for r in records if r["endpoint"] == "/v1/chat/completions" and r["status"] == 200]
    assert all(r["completion_tokens"] > 0 and r["finish_reason"] == "stop" for r in chat)
    refused = [r for r in records if r["status"] == 401]
    assert len(refused) == NUM_CONCURRENT // 10 and all(r["key_id"] is None for r in refused)
    # no prompt or completion text by default
    for name in os.listdir(os.path.join(home, "audit")):
        text = Path(home, "audit", name).read_text(errors="replace")
        assert "hunter2" not in text and "Hello world" not in text


@pytest.fixture
def chain(home) -> list[bytes]:
    """A ten-record log written directly; returns its lines."""
    audit = AuditLog()
    for i in range(10):
        audit.append({"request_id": f"r{i}", "status": 200, "prompt_tokens": i})
    audit.close()
    assert verify_log().ok
    return lines(home)


def rehash(line: bytes, **changes) -> bytes:
    record = json.loads(line)
    record.update(changes)
    record["hash"] = record_hash(record)
    return canonical(record) + b"\n"


def forged_after(line: bytes, seq: int) -> bytes:
    prev = json.loads(line)
    record = {"seq": seq, "request_id": "forged", "status": 200, "prompt_tokens": 0, "prev": prev["hash"]}
    record["hash"] = record_hash(record)
    return canonical(record) + b"\n"


TAMPERING = {
    # name: (how, first line named)
    "edit a field": (lambda ls: ls[:4] + [ls[4].replace(b'"prompt_tokens":4', b'"prompt_tokens":0')] + ls[5:], 5),
    "edit and rehash": (lambda ls: ls[:4] + [rehash(ls[4], status=500)] + ls[5:], 6),
    "edit the last record and rehash": (lambda ls: ls[:9] + [rehash(ls[9], status=500)], 10),
    "remove a record": (lambda ls: ls[:3] + ls[4:], 4),
    "remove the first record": (lambda ls: ls[1:], 1),
    "remove the last record": (lambda ls: ls[:9], 10),
    "insert a record": (lambda ls: ls[:5] + [forged_after(ls[4], 6)] + ls[5:], 7),
    "insert a renumbered record": (lambda ls: ls[:5] + [forged_after(ls[4], 99)] + ls[5:], 6),
    "swap two records": (lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:], 3),
    "move a record to the end": (lambda ls: ls[:2] + ls[3:] + [ls[2]], 3),
    "duplicate a record": (lambda ls: ls[:6] + [ls[5]] + ls[6:], 7),
    "cut the last line short": (lambda ls: ls[:9] + [ls[9][:40]], 10),
    "garbage line": (lambda ls: ls[:2] + [b"not json\n"] + ls[2:], 3),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampering_is_detected_and_located(chain, home, capsys, name):
    how, line = TAMPERING[name]
    write_lines(home, how(chain))
    result = verify_log()
    assert not result.ok and result.line == line, result
    code, out = run_verify(capsys)
    assert code == 1 and out.startswith("BROKEN: ") and f"line {line}" in out, out


def test_head_file_removed_or_rewritten(chain, home, capsys):
    head = os.path.join(home, "audit", "head")
    os.unlink(head)
    assert run_verify(capsys)[0] == 1
    with open(head, "w") as f:
        f.write("garbage")
    assert run_verify(capsys)[0] == 1


def test_verify_json_and_an_empty_log(home, capsys):
    assert main(["audit", "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "num_records": 0, "head": None, "line": None,
                                                   "problem": None}  # fmt: skip


def test_concurrent_writers_across_threads_and_processes(home):
    """Two other processes and four threads append at once (flock + thread lock): the chain stays whole."""
    script = ("import sys\nfrom hearth.governance.audit import AuditLog\nlog = AuditLog(sys.argv[1])\n"
              "for i in range(40):\n    log.append({'request_id': f'p{sys.argv[2]}-{i}'})\n")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", script, home, str(n)]) for n in range(2)]
    audit = AuditLog()

    def work(t: int) -> None:
        for i in range(25):
            audit.append({"request_id": f"t{t}-{i}", "status": 200})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    result = verify_log()
    assert result.ok and result.num_records == 2 * 40 + 4 * 25, result
    assert stat.S_IMODE(os.stat(log_path(home)).st_mode) == 0o600


def test_a_record_cut_short_by_a_crash_is_dropped_on_the_next_append(chain, home):
    write_lines(home, chain + [chain[0][:30]])  # a write interrupted mid-line
    assert not verify_log().ok
    AuditLog().append({"request_id": "after-crash", "status": 200})
    result = verify_log()
    assert result.ok and result.num_records == 11


def test_every_record_is_fsynced(home, monkeypatch):
    import hearth.governance.audit as audit_mod

    synced = []
    monkeypatch.setattr(audit_mod.os, "fsync", lambda fd: synced.append(fd))
    audit = AuditLog()
    audit.append({"request_id": "a"})
    audit.append({"request_id": "b"})
    assert len(synced) == 4  # the log and the head, per record


def test_transcripts_are_encrypted_at_rest(home, capsys):
    audit = AuditLog(transcripts=True)
    with TestClient(make_app(FakeEngine(), audit=audit)) as c:
        r = c.post("/v1/chat/completions", json=chat_body(1))
    request_id = r.json()["id"]
    folder = os.path.join(home, "audit")
    for name in os.listdir(folder):
        text = Path(folder, name).read_bytes()
        assert b"hunter2" not in text and b"Hello world" not in text
    key_file = os.path.join(folder, "transcripts.key")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    (record,) = read_records()
    assert record["request_id"] == request_id and record["transcript"] is True
    transcript = read_transcript(request_id)
    assert SECRET_PROMPT in transcript["request"] and "Hello world" in transcript["response"]
    assert main(["audit", "transcript", request_id]) == 0
    assert "hunter2" in capsys.readouterr().out
    # the wrong key does not decrypt it
    from cryptography.fernet import Fernet

    with open(key_file, "wb") as f:
        f.write(Fernet.generate_key())
    with pytest.raises(ValueError, match="does not decrypt"):
        read_transcript(request_id)


def test_show_table_json_since_and_limit(chain, capsys):
    assert main(["audit", "show"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("TIME (UTC)") and len(out.splitlines()) == 11 and "r9" in out
    assert main(["audit", "show", "--json", "--limit", "3"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in shown] == ["r7", "r8", "r9"]
    assert main(["audit", "show", "--since", "1h", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10
    assert main(["audit", "show", "--since", "2999-01-01"]) == 0
    assert "no audit records since then" in capsys.readouterr().out
