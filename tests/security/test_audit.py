"""The audit log: one hash-chained, MAC'd record per request, durable and safe under concurrency; `hearth audit verify`
names the first broken record after an edit, removal, insertion or reordering, a record or head forged without the
key, a malformed line (duplicate keys, deep nesting); a checkpoint kept elsewhere catches a rewrite by someone who has
the key; no text unless transcripts are on."""

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
    GENESIS,
    MAX_DEPTH,
    AuditLog,
    Checkpoint,
    _depth,
    canonical,
    head_mac,
    read_audit_key,
    read_records,
    read_transcript,
    record_hash,
    record_mac,
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)  # durability is tested on its own; these tests only tamper
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
    "edit and rehash": (lambda ls: ls[:4] + [rehash(ls[4], status=500)] + ls[5:], 5),
    "edit the last record and rehash": (lambda ls: ls[:9] + [rehash(ls[9], status=500)], 10),
    "remove a record": (lambda ls: ls[:3] + ls[4:], 4),
    "remove the first record": (lambda ls: ls[1:], 1),
    "remove the last record": (lambda ls: ls[:9], 10),
    "insert a record": (lambda ls: ls[:5] + [forged_after(ls[4], 6)] + ls[5:], 6),
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
                                                   "problem": None, "unauthenticated": 0,
                                                   "checkpoint": None}  # fmt: skip


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


def test_verify_while_a_writer_appends(home):
    """verify reads the log and the head under a shared lock, so a record appended in between is not a false alarm."""
    audit = AuditLog()
    assert verify_log().ok  # an opened log with no records yet (an empty head file) verifies

    def write() -> None:
        for i in range(150):
            audit.append({"request_id": f"busy-{i}"})

    writer = threading.Thread(target=write)
    writer.start()
    results = []
    while writer.is_alive():
        results.append(verify_log())
    writer.join()
    assert all(r.ok for r in results), next(r for r in results if not r.ok)
    assert verify_log().num_records == 150


def test_a_record_cut_short_by_a_crash_is_dropped_on_the_next_append(chain, home):
    write_lines(home, chain + [chain[0][:30]])  # a write interrupted mid-line
    assert not verify_log().ok
    AuditLog().append({"request_id": "after-crash", "status": 200})
    result = verify_log()
    assert result.ok and result.num_records == 11


def test_every_record_is_fsynced(home, monkeypatch):
    import hearth.governance.audit as audit_mod

    audit = AuditLog()  # creates the key first (its own fsyncs)
    synced = []
    monkeypatch.setattr(audit_mod.os, "fsync", lambda fd: synced.append(fd))
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


# --- the key, the head and checkpoints -------------------------------------------------------------------------------

N = 10  # records in the `chain` fixture
OTHER_KEY = bytes(range(32))


def audit_key(home: str) -> bytes:
    key = read_audit_key(os.path.join(home, "audit"))
    assert key is not None and len(key) == 32
    return key


def head_path(home: str) -> str:
    return os.path.join(home, "audit", "head")


def write_head(home: str, seq: int, hash_: str, mac: str | None) -> None:
    with open(head_path(home), "w") as f:
        f.write(f"{seq:020d} {hash_}" + (f" {mac}" if mac is not None else "") + "\n")


def hash_of(line: bytes) -> str:
    return json.loads(line)["hash"]


def make_record(prev_line: bytes | None, seq: int, key: bytes | None, mac: str | None = None, **fields) -> bytes:
    """A record that chains correctly after `prev_line` (the first if None); MAC'd with `key`, or carrying `mac`."""
    record = {"seq": seq, "time": "2026-01-01T00:00:00.000Z", "request_id": f"forged-{seq}", "status": 200,
              "prompt_tokens": 0, "prev": hash_of(prev_line) if prev_line else GENESIS, **fields}  # fmt: skip
    record["hash"] = record_hash(record)
    if key is not None:
        record["mac"] = record_mac(key, record["hash"])
    elif mac is not None:
        record["mac"] = mac
    return canonical(record) + b"\n"


def rewrite_all(count: int, key: bytes | None) -> list[bytes]:
    """A whole new, consistently chained log of `count` records (MAC'd with `key`, or none)."""
    out: list[bytes] = []
    for seq in range(1, count + 1):
        out.append(make_record(out[-1] if out else None, seq, key, status=418))
    return out


def verify_cli(capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["audit", "verify", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FORGED_MACS = {
    "no MAC": lambda key, ls: make_record(ls[-1], N + 1, None),
    "a random MAC": lambda key, ls: make_record(ls[-1], N + 1, None, mac="ab" * 32),
    "a MAC under another key": lambda key, ls: make_record(ls[-1], N + 1, OTHER_KEY),
    "the last record's MAC": lambda key, ls: make_record(ls[-1], N + 1, None, mac=json.loads(ls[-1])["mac"]),
}
FORGED_HEADS = {
    "left alone": lambda key, seq, h: None,
    "rewritten without a MAC": lambda key, seq, h: (seq, h, None),
    "rewritten with a random MAC": lambda key, seq, h: (seq, h, "cd" * 32),
    "rewritten with another key's MAC": lambda key, seq, h: (seq, h, head_mac(OTHER_KEY, seq, h)),
    "rewritten with the record's MAC": lambda key, seq, h: (seq, h, record_mac(key, h)),  # the record's ≠ the head's
}


@pytest.mark.parametrize("head", list(FORGED_HEADS))
@pytest.mark.parametrize("mac", list(FORGED_MACS))
def test_an_appended_forged_record_is_detected(chain, home, capsys, mac, head):
    """A correctly chained record appended without the key: its MAC gives it away, whatever the head says."""
    key = audit_key(home)
    forged = FORGED_MACS[mac](key, chain)
    write_lines(home, chain + [forged])
    new_head = FORGED_HEADS[head](key, N + 1, hash_of(forged))
    if new_head is not None:
        write_head(home, *new_head)
    result = verify_log()
    assert not result.ok and result.line == N + 1, result
    code, out, _ = verify_cli(capsys)
    assert code == 1 and out.startswith(f"BROKEN: line {N + 1} (record {N + 1}) has ") and "MAC" in out, out


@pytest.mark.parametrize("head", [h for h in FORGED_HEADS if h != "left alone"] + ["an earlier record's head MAC"])
@pytest.mark.parametrize("k", range(1, 6))
def test_records_cut_from_the_end_with_the_head_rewritten_are_detected(chain, home, capsys, k, head):
    key = audit_key(home)
    kept = chain[: N - k]
    seq, h = N - k, hash_of(kept[-1])
    if head == "an earlier record's head MAC":  # the MAC of the real head, pasted under the new seq and hash
        write_head(home, seq, h, head_mac(key, N, hash_of(chain[-1])))
    else:
        write_head(home, *FORGED_HEADS[head](key, seq, h))
    write_lines(home, kept)
    result = verify_log()
    assert not result.ok and "head" in result.problem and "MAC" in result.problem, result
    code, out, _ = verify_cli(capsys)
    assert code == 1 and out.startswith("BROKEN: the head file") and len(out.splitlines()) == 1, out


@pytest.mark.parametrize("k", range(1, 6))
def test_records_cut_from_the_end_with_the_head_left_are_detected(chain, home, k):
    write_lines(home, chain[: N - k])
    result = verify_log()
    assert not result.ok and result.line == N - k + 1 and "removed from the end" in result.problem, result


@pytest.mark.parametrize("k", range(1, 4))
@pytest.mark.parametrize("at", [0, 1, 4, 7])
def test_records_removed_anywhere_are_detected_at_the_gap(chain, home, at, k):
    write_lines(home, chain[:at] + chain[at + k :])
    result = verify_log()
    assert not result.ok and result.line == at + 1, result


@pytest.mark.parametrize("k", range(1, 6))
def test_a_cut_with_the_key_passes_alone_but_not_against_a_checkpoint_above_it(chain, home, capsys, k):
    """Someone with the key cuts k records and writes a valid head: only a checkpoint kept elsewhere shows it."""
    assert main(["audit", "checkpoint"]) == 0
    kept_cp = capsys.readouterr().out.strip()
    assert kept_cp == f"{N}:{hash_of(chain[-1])}"
    key = audit_key(home)
    write_lines(home, chain[: N - k])
    write_head(home, N - k, hash_of(chain[N - k - 1]), head_mac(key, N - k, hash_of(chain[N - k - 1])))
    assert verify_log().ok
    result = verify_log(against=Checkpoint.parse(kept_cp))
    assert not result.ok and result.line == N - k + 1 and "below the checkpoint" in result.problem, result
    code, out, _ = verify_cli(capsys, "--against", kept_cp)
    assert code == 1 and out.startswith(f"BROKEN: line {N - k + 1} is missing") and len(out.splitlines()) == 1
    # a checkpoint at or below the cut still holds: the records it covers are unchanged
    assert verify_log(against=Checkpoint(N - k, hash_of(chain[N - k - 1]))).ok
    assert verify_log(against=Checkpoint(1, hash_of(chain[0]))).ok


def test_a_whole_rewrite_without_the_key_is_detected(chain, home):
    # no MACs at all, head without one
    forged = rewrite_all(N, None)
    write_lines(home, forged)
    write_head(home, N, hash_of(forged[-1]), None)
    result = verify_log()
    assert not result.ok and "head" in result.problem and "no MAC" in result.problem, result
    # MACs and head under another key
    forged = rewrite_all(N, OTHER_KEY)
    write_lines(home, forged)
    write_head(home, N, hash_of(forged[-1]), head_mac(OTHER_KEY, N, hash_of(forged[-1])))
    result = verify_log()
    assert not result.ok and result.line == 1 and "wrong MAC" in result.problem, result
    # MACs stripped and the key deleted, to pass as a log from before the key
    forged = rewrite_all(N, None)
    write_lines(home, forged)
    write_head(home, N, hash_of(forged[-1]), None)
    os.unlink(os.path.join(home, "audit", "audit.key"))
    result = verify_log()
    assert not result.ok and "none of the 10 records is authenticated" in result.problem, result


@pytest.mark.parametrize("key_source", ["the key", "a replaced key file"])
@pytest.mark.parametrize("count", [N - 3, N, N + 4])
def test_a_whole_rewrite_with_the_key_is_detected_only_against_a_checkpoint(chain, home, capsys, key_source, count):
    cp = Checkpoint(7, hash_of(chain[6]))
    key = audit_key(home)
    if key_source == "a replaced key file":  # write access to audit/ is enough to swap in one's own key
        key = OTHER_KEY
        with open(os.path.join(home, "audit", "audit.key"), "w") as f:
            f.write(key.hex() + "\n")
    forged = rewrite_all(count, key)
    write_lines(home, forged)
    write_head(home, count, hash_of(forged[-1]), head_mac(key, count, hash_of(forged[-1])))
    code, out, _ = verify_cli(capsys)
    assert code == 0 and out.startswith(f"ok: {count} records"), out
    code, out, _ = verify_cli(capsys, "--against", str(cp))
    assert code == 1 and out.startswith("BROKEN: line 7 (record 7) does not match the checkpoint"), out


def test_checkpoint_round_trip(chain, home, capsys, tmp_path):
    assert main(["audit", "checkpoint"]) == 0
    captured = capsys.readouterr()
    cp = captured.out.strip()
    assert cp == f"{N}:{hash_of(chain[-1])}" and "verify --against" in captured.err
    assert main(["audit", "checkpoint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"records": N, "hash": hash_of(chain[-1]), "checkpoint": cp}
    audit = AuditLog()
    for i in range(5):  # the log grows after the checkpoint: it still holds the checkpoint's records
        audit.append({"request_id": f"later-{i}"})
    audit.close()
    code, out, _ = verify_cli(capsys, "--against", cp)
    assert code == 0 and f"records 1-{N} match checkpoint {N}" in out and f"checkpoint {N + 5}:" in out, out
    kept = tmp_path / "kept.txt"
    kept.write_text(cp + "\n")
    assert verify_cli(capsys, "--against", str(kept))[0] == 0
    assert verify_cli(capsys, "--against", cp.upper())[0] == 0  # hex in either case
    result = verify_log(against=Checkpoint.parse(cp))
    assert result.ok and result.checkpoint == f"{N + 5}:{hash_of(lines(home)[-1])}"
    # a checkpoint this log never had
    code, out, _ = verify_cli(capsys, "--against", f"3:{'e' * 64}")
    assert code == 1 and out.startswith("BROKEN: line 3 (record 3) does not match the checkpoint"), out
    code, out, _ = verify_cli(capsys, "--against", f"99:{hash_of(chain[-1])}")
    assert code == 1 and out.startswith("BROKEN: line 16 is missing"), out
    # not a checkpoint: one line, exit 1
    for bad in ["", "10", "ten:abc", f"10:{'g' * 64}", f"-1:{'0' * 64}", str(tmp_path / "missing")]:
        code, out, err = verify_cli(capsys, f"--against={bad}")
        assert code == 1 and err.startswith("hearth: error: ") and len(err.splitlines()) == 1, (bad, err)


def test_checkpoint_refuses_a_broken_or_empty_log(home, capsys):
    assert main(["audit", "checkpoint"]) == 1
    assert "empty" in capsys.readouterr().err
    audit = AuditLog()
    audit.append({"request_id": "a"})
    audit.close()
    write_lines(home, [lines(home)[0].replace(b'"request_id":"a"', b'"request_id":"b"')])
    assert main(["audit", "checkpoint"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hearth: error: the audit log does not verify") and "line 1" in err


# --- malformed lines ------------------------------------------------------------------------------------------------


def dup_ahead(line: bytes, field: str, value) -> bytes:
    """`line` with `field` given a second time, ahead of the real one (a lax parser keeps the last value)."""
    return b"{" + json.dumps(field).encode() + b":" + json.dumps(value).encode() + b"," + line[1:]


@pytest.mark.parametrize("field", ["status", "request_id", "seq", "prev", "hash", "mac", "prompt_tokens", "time"])
@pytest.mark.parametrize("same_value", [False, True])
def test_a_duplicate_key_ahead_of_the_real_one_is_rejected(chain, home, capsys, field, same_value):
    record = json.loads(chain[4])
    value = record[field] if same_value else {"status": 500, "seq": 99, "prompt_tokens": 10**6}.get(field, "x" * 64)
    write_lines(home, chain[:4] + [dup_ahead(chain[4].rstrip(b"\n"), field, value) + b"\n"] + chain[5:])
    result = verify_log()
    assert not result.ok and result.line == 5 and f"the key '{field}' appears twice" in result.problem, result
    code, out, _ = verify_cli(capsys)
    assert code == 1 and out.startswith("BROKEN: line 5 is not an audit record") and len(out.splitlines()) == 1


NOT_CANONICAL = {
    "a space": lambda line: line.replace(b'","', b'", "', 1),
    "keys reordered": lambda line: canonical_unsorted(line),
    "an escaped character": lambda line: line.replace(b'"r4"', b'"\\u0072\\u0034"'),
}


def canonical_unsorted(line: bytes) -> bytes:
    record = json.loads(line)
    return json.dumps(dict(reversed(record.items())), separators=(",", ":")).encode() + b"\n"


@pytest.mark.parametrize("how", list(NOT_CANONICAL))
def test_a_record_not_in_canonical_form_is_rejected(chain, home, how):
    write_lines(home, chain[:4] + [NOT_CANONICAL[how](chain[4])] + chain[5:])
    result = verify_log()
    assert not result.ok and result.line == 5 and "canonical" in result.problem, result


DEEP = {
    "arrays": lambda d: b"[" * d + b"]" * d,
    "objects": lambda d: b'{"a":' * d + b"1" + b"}" * d,
    "unclosed": lambda d: b"[" * d,
    "inside a record": lambda d: b'{"seq":11,"x":' + b"[" * d + b"]" * d + b"}",
}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
@pytest.mark.parametrize("shape", list(DEEP))
def test_deep_nesting_gives_a_one_line_verdict(chain, home, capsys, shape, depth):
    write_lines(home, chain + [DEEP[shape](depth) + b"\n"])
    result = verify_log()
    assert not result.ok and result.line == N + 1 and "nests deeper" in result.problem, result
    code, out, err = verify_cli(capsys)
    assert code == 1 and out == f"BROKEN: line {N + 1} is not an audit record: it nests deeper than {MAX_DEPTH} levels\n"
    assert "Traceback" not in err and "Recursion" not in out + err
    assert main(["audit", "show", "--json"]) == 0  # show skips the line
    assert len(capsys.readouterr().out.splitlines()) == N


def test_deep_nesting_through_the_command_line(chain, home):
    """The installed entry point, in a fresh interpreter: one line on stdout, no traceback."""
    write_lines(home, chain[:3] + [b"[" * 100_000 + b"]" * 100_000 + b"\n"] + chain[3:])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "hearth.cli.main", "audit", "verify"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc
    assert proc.stdout == f"BROKEN: line 4 is not an audit record: it nests deeper than {MAX_DEPTH} levels\n"
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_the_writer_survives_a_deep_last_line(chain, home):
    write_lines(home, chain + [b"[" * 100_000 + b"]" * 100_000 + b"\n"])
    record = AuditLog().append({"request_id": "after"})
    assert record["seq"] == 1  # it cannot chain on from garbage; verify still names the bad line
    result = verify_log()
    assert not result.ok and result.line == N + 1


@pytest.mark.parametrize(
    ("text", "depth"),
    [(b"{}", 1), (b'{"a":[1,{"b":2}]}', 3), (b'{"a":"[[[[[[[[{{{{"}', 1), (b'{"a":"\\"[[[[[[","b":[]}', 2),
     (b'{"a\\\\":"]]]]"}', 1), (b"1", 0), (b"", 0)],
)  # fmt: skip
def test_depth_skips_brackets_inside_strings(text, depth):
    assert _depth(text) == depth


def test_unclosed_strings_are_scanned_in_one_pass(chain, home):
    """Quote-backslash pairs: each quote opens a string that never closes (a naive string pattern retries from every
    quote to the end of the line)."""
    write_lines(home, chain + [b'"\\' * 30_000 + b"\n"])
    result = verify_log()
    assert not result.ok and result.line == N + 1


GARBAGE = [b"", b"null", b"[]", b'"text"', b"{}", b'{"seq":1}', b"\xff\xfe", b'{"seq":true,"prev":"","hash":""}',
           b"NaN", b'{"seq":1,"prev":1,"hash":2}', b"{" * 3, b"x" * 70_000]  # fmt: skip


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("at", [0, 5, N])
def test_any_garbage_line_gets_a_one_line_verdict_naming_it(chain, home, capsys, garbage, at):
    write_lines(home, chain[:at] + [garbage + b"\n"] + chain[at:])
    code, out, err = verify_cli(capsys)
    assert code == 1 and out.startswith(f"BROKEN: line {at + 1} is not an audit record: ") and len(out.splitlines()) == 1
    assert "Traceback" not in err


# --- key file, logs from before the key -----------------------------------------------------------------------------


def test_key_file_is_0600_even_with_a_wide_umask(home):
    old = os.umask(0)
    try:
        AuditLog(transcripts=True).append({"request_id": "a"})
    finally:
        os.umask(old)
    folder = os.path.join(home, "audit")
    for name in ("audit.key", "transcripts.key", "audit.jsonl", "head"):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]  # no temporary file left behind
    key = audit_key(home)
    AuditLog()  # reopening keeps the key
    assert audit_key(home) == key


@pytest.mark.parametrize("content", [b"", b"short\n", b"zz" * 32 + b"\n", b"ab" * 33 + b"\n"])
def test_a_damaged_key_file_fails_verification_in_one_line(chain, home, capsys, content):
    with open(os.path.join(home, "audit", "audit.key"), "wb") as f:
        f.write(content)
    code, out, _ = verify_cli(capsys)
    assert code == 1 and out.startswith("BROKEN: the audit key") and len(out.splitlines()) == 1, out


def test_concurrent_first_opens_share_one_key(home):
    """Six processes open a fresh log at once: one key is created, every record verifies under it."""
    script = ("import sys\nfrom hearth.governance.audit import AuditLog\nlog = AuditLog(sys.argv[1])\n"
              "for i in range(10):\n    log.append({'request_id': f'p{sys.argv[2]}-{i}'})\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", script, home, str(n)], env=env) for n in range(6)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    result = verify_log()
    assert result.ok and result.num_records == 60 and result.unauthenticated == 0, result


def legacy_log(home: str, count: int) -> list[bytes]:
    """A log as written before the key: records without `mac`, a head without one, no key file."""
    os.makedirs(os.path.join(home, "audit"), mode=0o700, exist_ok=True)
    old = rewrite_all(count, None)
    write_lines(home, old)
    write_head(home, count, hash_of(old[-1]), None)
    return old


def test_a_log_from_before_the_key(home, capsys):
    legacy_log(home, 6)
    # no key yet: nothing is authenticated, and that is not passed as ok
    code, out, _ = verify_cli(capsys)
    assert code == 1 and "none of the 6 records is authenticated" in out, out
    AuditLog().close()  # the first open creates the key and vouches for the log as it stands
    result = verify_log()
    assert result.ok and result.unauthenticated == 6, result
    code, out, _ = verify_cli(capsys)
    assert code == 0 and "records 1-6 were written before the log had its key" in out, out
    audit = AuditLog()
    audit.append({"request_id": "new"})
    audit.close()
    result = verify_log()
    assert result.ok and result.num_records == 7 and result.unauthenticated == 6, result
    # from then on the old records are covered: editing one breaks the chain
    ls = lines(home)
    write_lines(home, ls[:2] + [rehash(ls[2], status=500)] + ls[3:])
    assert not verify_log().ok
    write_lines(home, ls)
    # and a record without a MAC cannot follow MAC'd ones, nor come after the head
    write_lines(home, ls + [make_record(ls[-1], 8, None)])
    result = verify_log()
    assert not result.ok and result.line == 8 and "no MAC" in result.problem, result
    write_lines(home, ls[:6])
    write_head(home, 6, hash_of(ls[5]), head_mac(audit_key(home), 6, hash_of(ls[5])))
    write_lines(home, ls[:6] + [make_record(ls[5], 7, None)])
    result = verify_log()
    assert not result.ok and result.line == 7 and "after the head" in result.problem, result


def test_a_record_past_the_head_after_a_crash_still_verifies(chain, home):
    """A crash between a record's write and the head's leaves the head one behind; the record's MAC vouches for it."""
    key = audit_key(home)
    write_head(home, N - 1, hash_of(chain[N - 2]), head_mac(key, N - 1, hash_of(chain[N - 2])))
    assert verify_log().ok
    AuditLog().append({"request_id": "next"})
    result = verify_log()
    assert result.ok and result.num_records == N + 1
