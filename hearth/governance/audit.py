"""The audit log: one JSON line per request in `$HEARTH_HOME/audit/audit.jsonl`, hash-chained.

Each record carries `seq` (1, 2, ...), `prev` (the previous record's hash; 64 zeros for the first) and `hash` (SHA-256
of the record's canonical JSON without `hash`). `audit/head` holds the last record's seq and hash, so removing records
from the end is detected too. `verify_log` names the first line where the chain breaks.

Durability: every record is fsynced, then the head is rewritten in place and fsynced (two fsyncs, a few ms on an SSD,
paid in a worker thread after the response has gone out, so clients do not wait for it). A record is lost only if
the process dies between sending the response and that write.
Concurrency: a thread lock within a process and an flock on the log across processes; under the lock the writer
rereads the tail whenever the file grew behind its back, so several servers may share one $HEARTH_HOME.
Limits: a chain without a secret only makes tampering evident to someone who kept an old head hash or a copy; an
attacker with write access can rewrite the whole file and head consistently. `hearth audit verify` prints the head
hash, so it can be noted elsewhere.

No prompt or completion text is recorded. With transcripts on, the request and response bodies go, encrypted with
Fernet (AES-128-CBC + HMAC-SHA256; key in `audit/transcripts.key`, mode 0600), to `audit/transcripts.jsonl`, one
line per request id.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

LOG_NAME = "audit.jsonl"
HEAD_NAME = "head"
TRANSCRIPTS_NAME = "transcripts.jsonl"
TRANSCRIPT_KEY_NAME = "transcripts.key"
GENESIS = "0" * 64
FILE_MODE = 0o600
FIELDS = ("seq", "time", "request_id", "key_id", "client", "method", "endpoint", "model", "prompt_tokens",
          "completion_tokens", "cached_tokens", "status", "latency_ms", "finish_reason", "transcript", "prev",
          "hash")  # fmt: skip


class AuditError(ValueError):
    pass


def audit_dir(home: str | None = None) -> str:
    return os.path.join(home or hearth_home(), "audit")


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict) -> str:
    """SHA-256 of the record without its `hash` field, in canonical JSON."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def _last_line(fd: int) -> tuple[bytes | None, int]:
    """(the last complete line, the file size after dropping a partial last line) of the file behind `fd`."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, 0
    chunk, pos = b"", size
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        chunk = os.pread(fd, step, pos) + chunk
        body = chunk.rstrip(b"\n") if chunk.endswith(b"\n") else chunk
        if b"\n" in body or pos == 0:
            break
    if not chunk.endswith(b"\n"):  # a record cut short by a crash mid-write: never completed, never acknowledged
        keep = chunk.rfind(b"\n") + 1
        logger.warning("audit log ends with an incomplete record (%d bytes); dropping it", len(chunk) - keep)
        size = pos + keep
        os.ftruncate(fd, size)
        chunk = chunk[:keep]
        if not chunk:
            return None, size
    lines = chunk[:-1].split(b"\n")
    return lines[-1], size


class AuditLog:
    """Appends hash-chained records; `append` is thread-safe and safe across processes (blocking: call it from a
    worker thread in async code)."""

    def __init__(self, home: str | None = None, transcripts: bool = False) -> None:
        self.dir = audit_dir(home)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(self.dir, LOG_NAME)
        self.head_path = os.path.join(self.dir, HEAD_NAME)
        self.transcripts = Transcripts(self.dir) if transcripts else None
        self._lock = threading.Lock()
        self._fd = _open(self.path, os.O_RDWR | os.O_APPEND)
        self._head_fd = _open(self.head_path, os.O_RDWR)
        self._tail: tuple[int, int, str] | None = None  # (file size, seq, hash) after our last append

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._head_fd):
                os.close(fd)
            self._fd = self._head_fd = -1

    def _read_tail(self) -> tuple[int, str]:
        size = os.fstat(self._fd).st_size
        if self._tail is not None and self._tail[0] == size:
            return self._tail[1], self._tail[2]
        line, _ = _last_line(self._fd)
        if line is None:
            return 0, GENESIS
        try:
            last = json.loads(line)
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            logger.error("the last audit record is not valid; chaining on from its raw bytes (verify will fail)")
            return 0, hashlib.sha256(line).hexdigest()

    def append(self, entry: dict) -> dict:
        """Add one record (the `entry` fields plus seq, prev and hash), durably. Returns the record."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                seq, prev = self._read_tail()
                record = {"seq": seq + 1, "time": utc_timestamp(), **entry, "prev": prev}
                record["hash"] = record_hash(record)
                os.write(self._fd, canonical(record) + b"\n")
                os.fsync(self._fd)
                self._tail = (os.fstat(self._fd).st_size, record["seq"], record["hash"])
                os.pwrite(self._head_fd, f"{record['seq']:020d} {record['hash']}\n".encode(), 0)
                os.fsync(self._head_fd)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return record


# --- transcripts ----------------------------------------------------------------------------------------------------


class Transcripts:
    """Request and response bodies, encrypted at rest, one JSON line per request id."""

    def __init__(self, folder: str) -> None:
        from cryptography.fernet import Fernet

        self.path = os.path.join(folder, TRANSCRIPTS_NAME)
        self.key_path = os.path.join(folder, TRANSCRIPT_KEY_NAME)
        self._fernet = Fernet(load_or_create_key(self.key_path))
        self._lock = threading.Lock()

    def save(self, request_id: str, request_body: bytes, response_body: bytes) -> None:
        data = json.dumps({"request": request_body.decode("utf-8", "replace"),
                           "response": response_body.decode("utf-8", "replace")}).encode()  # fmt: skip
        line = json.dumps({"request_id": request_id, "data": self._fernet.encrypt(data).decode()}).encode() + b"\n"
        with self._lock:
            fd = _open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def load_or_create_key(path: str) -> bytes:
    """The Fernet key in `path`, created (mode 0600, atomically: O_EXCL) on first use."""
    from cryptography.fernet import Fernet

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        with open(path, "rb") as f:
            return f.read().strip()
    key = Fernet.generate_key()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def read_transcript(request_id: str, home: str | None = None) -> dict:
    """Decrypt the transcript of one request: {"request": body text, "response": body text}."""
    from cryptography.fernet import Fernet, InvalidToken

    folder = audit_dir(home)
    path = os.path.join(folder, TRANSCRIPTS_NAME)
    key_path = os.path.join(folder, TRANSCRIPT_KEY_NAME)
    if not os.path.exists(path) or not os.path.exists(key_path):
        raise AuditError(f"no transcripts in {folder} (serve with --transcripts to keep them)")
    with open(key_path, "rb") as f:
        fernet = Fernet(f.read().strip())
    with open(path, "rb") as f:
        for line in f:
            item = json.loads(line)
            if item.get("request_id") == request_id:
                try:
                    return json.loads(fernet.decrypt(item["data"].encode()))
                except InvalidToken:
                    raise AuditError(f"the transcript of {request_id} does not decrypt: wrong key or "
                                     "tampered") from None  # fmt: skip
    raise AuditError(f"no transcript for request {request_id}")


# --- reading and verifying ------------------------------------------------------------------------------------------


def read_records(home: str | None = None) -> Iterator[dict]:
    """Every parseable record in order (for `hearth audit show`; `verify_log` is the integrity check)."""
    path = os.path.join(audit_dir(home), LOG_NAME)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    num_records: int
    head: str | None = None  # the last record's hash
    line: int | None = None  # first broken line (1-based)
    problem: str | None = None


def read_head(folder: str) -> tuple[int, str] | None:
    try:
        with open(os.path.join(folder, HEAD_NAME), "rb") as f:
            text = f.read().decode("ascii", "replace").split()
    except FileNotFoundError:
        return None
    if len(text) != 2 or not text[0].isdigit():
        return -1, ""
    return int(text[0]), text[1]


def verify_log(home: str | None = None) -> VerifyResult:
    """Walk the chain; the first problem found is reported with its line number."""
    folder = audit_dir(home)
    path = os.path.join(folder, LOG_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    elif data:
        return VerifyResult(False, len(lines) - 1, line=len(lines),
                            problem=f"line {len(lines)} is incomplete (cut short, or text appended)")  # fmt: skip
    prev, hashes = GENESIS, {}  # hash → line of each record, to name the line a broken link points back to
    seqs: dict[int, int] = {}
    for n, raw in enumerate(lines, start=1):

        def broken(problem: str, n: int = n) -> VerifyResult:
            return VerifyResult(False, n - 1, line=n, problem=problem)

        try:
            record = json.loads(raw)
            seq, rec_prev, rec_hash = record["seq"], record["prev"], record["hash"]
        except (ValueError, KeyError, TypeError):
            return broken(f"line {n} is not an audit record")
        if record_hash(record) != rec_hash:
            return broken(f"line {n} (record {seq}) was edited: its content does not match its hash")
        if seq != n:
            if seq in seqs:
                what = (f"a second record {seq} (line {seqs[seq]} holds one too): a record was inserted at line "
                        f"{seqs[seq]} or {n}, or records were duplicated")  # fmt: skip
            elif isinstance(seq, int) and seq > n:
                what = f"record {seq} where record {n} should be: records were removed before it, or reordered"
            else:
                what = f"record {seq} where record {n} should be: records were inserted or reordered"
            return broken(f"line {n} holds {what}")
        if rec_prev != prev:
            where = hashes.get(rec_prev)
            cause = (f"it follows line {where}, not line {n - 1}: records were reordered or removed" if where else
                     f"line {n - 1} was edited (and its hash recomputed) or inserted, or records were removed "
                     "between them")  # fmt: skip
            return broken(f"line {n} (record {seq}) does not chain to the record before it: {cause}")
        hashes[rec_hash] = n
        seqs[seq] = n
        prev = rec_hash
    num = len(lines)
    head = read_head(folder)
    if head is None:
        if num:
            return VerifyResult(False, num, line=None, problem="the head file audit/head is missing")
        return VerifyResult(True, 0, head=None)
    head_seq, head_hash = head
    if head_seq < 0:
        return VerifyResult(False, num, problem="the head file audit/head is not readable")
    if head_seq > num:
        removed = f"record {head_seq} was" if head_seq == num + 1 else f"records {num + 1} to {head_seq} were"
        return VerifyResult(False, num, line=num + 1,
                            problem=f"line {num + 1} is missing: the log ends at record {num} but the head says "
                            f"{head_seq}: {removed} removed from the end")  # fmt: skip
    if head_seq >= 1:
        record_at_head = json.loads(lines[head_seq - 1])
        if record_at_head["hash"] != head_hash:
            return VerifyResult(False, num, line=head_seq,
                                problem=f"line {head_seq} (record {head_seq}) does not match the head hash: the "
                                "records from there on were rewritten")  # fmt: skip
    elif num:
        return VerifyResult(False, num, problem="the head says the log is empty but it holds records")
    return VerifyResult(True, num, head=prev if num else None)
