"""The audit log: one JSON line per request in `$HEARTH_HOME/audit/audit.jsonl`, hash-chained and keyed.

Each record carries `seq` (1, 2, ...), `prev` (the previous record's hash; 64 zeros for the first), `hash` (SHA-256
of the record's canonical JSON without `hash` and `mac`) and `mac` (HMAC-SHA256 of the hash under the key in
`audit/audit.key`, 32 random bytes, mode 0600, created atomically on first use). The hash chain makes an edit,
removal, insertion or reordering visible; the MAC makes a record added or rewritten without the key visible, so a
forged record cannot be appended. `audit/head` holds the last record's seq, hash and its own MAC (a different message
from the record's), so records cut from the end with the head rewritten are detected too. `verify_log` names the
first line where the chain breaks; `verify_log(against=...)` also checks a checkpoint (`seq:hash`, printed by
`hearth audit checkpoint`) kept outside `$HEARTH_HOME`: the log must still hold that record with that hash, so a
rewrite or truncation at or before it is detected even by someone who has the key.

What it does not prove: whoever can read the key (write access to `$HEARTH_HOME`, as the server has) can rewrite
everything after the last checkpoint kept elsewhere; a copy of an earlier head file, restored with the log cut back
to it, is a consistent earlier state; deleting the whole audit folder leaves nothing to check.

Logs from before the key: their records have no `mac`. The first `AuditLog` that creates the key MACs the head over
them, and every later record's MAC covers them through the chain. `verify_log` counts them (`unauthenticated`): the
chain vouches for them from the moment the key was created, not for how they were written. With no key at all, a
log with records fails verification (it cannot be told from one whose key was deleted and MACs stripped).

Parsing: every line must be the canonical JSON of a flat object (no duplicate keys, nesting at most `MAX_DEPTH`,
checked by counting brackets outside strings before `json.loads`, which would otherwise recurse once per level),
so a malformed line gets a one-line verdict naming it.

Durability: every record is fsynced, then the head is rewritten in place and fsynced (two fsyncs, a few ms on an SSD,
paid in a worker thread after the response has gone out, so clients do not wait for it). A record is lost only if
the process dies between sending the response and that write.
Concurrency: a thread lock within a process and an flock on the log across processes; under the lock the writer
rereads the tail whenever the file grew behind its back, so several servers may share one $HEARTH_HOME.

No prompt or completion text is recorded. With transcripts on, the request and response bodies go, encrypted with
Fernet (AES-128-CBC + HMAC-SHA256; key in `audit/transcripts.key`, mode 0600), to `audit/transcripts.jsonl`, one
line per request id.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

LOG_NAME = "audit.jsonl"
HEAD_NAME = "head"
KEY_NAME = "audit.key"
TRANSCRIPTS_NAME = "transcripts.jsonl"
TRANSCRIPT_KEY_NAME = "transcripts.key"
GENESIS = "0" * 64
FILE_MODE = 0o600
FIELDS = ("seq", "time", "request_id", "key_id", "client", "method", "endpoint", "model", "prompt_tokens",
          "completion_tokens", "cached_tokens", "status", "latency_ms", "finish_reason", "transcript", "prev",
          "hash", "mac")  # fmt: skip
MAX_DEPTH = 4  # records are flat objects; anything nested deeper is not a record
MAX_LINE = 1 << 16  # bytes; a record is a few hundred
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)  # an unclosed string runs to the end: linear time
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _DEPTH_STEP)
_RECORD_MAC, _HEAD_MAC = b"hearth-audit-record\0", b"hearth-audit-head\0"  # distinct, so one cannot stand for the other


class AuditError(ValueError):
    pass


def audit_dir(home: str | None = None) -> str:
    return os.path.join(home or hearth_home(), "audit")


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict) -> str:
    """SHA-256 of the record without its `hash` and `mac` fields, in canonical JSON."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k not in ("hash", "mac")})).hexdigest()


def record_mac(key: bytes, hash_: str) -> str:
    """The MAC of a record: over its hash, which covers its content and, through `prev`, every record before it."""
    return hmac.new(key, _RECORD_MAC + hash_.encode(), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, hash_: str) -> str:
    return hmac.new(key, _HEAD_MAC + f"{seq}:{hash_}".encode(), hashlib.sha256).hexdigest()


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def create_once(path: str, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(the contents of `path`, whether this call created it). A new file is written whole to a temporary file
    (mode 0600 whatever the umask), fsynced, then linked into place: a concurrent reader sees either no file or the
    whole file, and when two processes race, the first link wins and both return its contents."""
    folder = os.path.dirname(path)
    try:
        with open(path, "rb") as f:
            return f.read(), False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, FILE_MODE)
        data = make()
        os.write(fd, data)
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            with open(path, "rb") as f:
                return f.read(), False
    finally:
        os.close(fd)
        os.unlink(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return data, True


def _parse_key(text: bytes, path: str) -> bytes:
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise AuditError(f"the audit key {path} is not 64 hex digits: it was damaged or replaced")
    return key


def load_or_create_audit_key(folder: str) -> tuple[bytes, bool]:
    """(the audit HMAC key in `folder`, whether it was created now)."""
    path = os.path.join(folder, KEY_NAME)
    text, created = create_once(path, lambda: secrets.token_hex(32).encode() + b"\n")
    return _parse_key(text, path), created


def read_audit_key(folder: str) -> bytes | None:
    path = os.path.join(folder, KEY_NAME)
    try:
        with open(path, "rb") as f:
            return _parse_key(f.read(), path)
    except FileNotFoundError:
        return None


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text, strings skipped; no recursion, so any depth is measured."""
    steps = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(_DEPTH_STEP[b] for b in steps), default=0)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise AuditError(f"the key {dup!r} appears twice")
    return record


def parse_record(raw: bytes) -> dict:
    """One log line as a record, or AuditError saying what is wrong with it (never RecursionError)."""
    if _depth(raw) > MAX_DEPTH:
        raise AuditError(f"it nests deeper than {MAX_DEPTH} levels")
    if len(raw) > MAX_LINE:
        raise AuditError(f"it is {len(raw)} bytes long, more than any record ({MAX_LINE})")
    try:
        record = json.loads(raw, object_pairs_hook=_no_duplicates)
    except AuditError:
        raise
    except (ValueError, RecursionError):
        raise AuditError("it is not JSON") from None
    if not isinstance(record, dict):
        raise AuditError("it is not a JSON object")
    seq, prev, hash_, mac = record.get("seq"), record.get("prev"), record.get("hash"), record.get("mac", "")
    if type(seq) is not int or not all(isinstance(v, str) for v in (prev, hash_, mac)):
        raise AuditError("it lacks seq, prev or hash, or one of them has the wrong type")
    if not (_HEX64.fullmatch(prev) and _HEX64.fullmatch(hash_) and (mac == "" or _HEX64.fullmatch(mac))):
        raise AuditError("its prev, hash or mac is not 64 lowercase hex digits")
    if canonical(record) != raw:
        raise AuditError("it is not in canonical form (keys reordered, spaces or escapes changed)")
    return record


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
    """Appends hash-chained, MAC'd records; `append` is thread-safe and safe across processes (blocking: call it from
    a worker thread in async code)."""

    def __init__(self, home: str | None = None, transcripts: bool = False) -> None:
        self.dir = audit_dir(home)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(self.dir, LOG_NAME)
        self.head_path = os.path.join(self.dir, HEAD_NAME)
        self.transcripts = Transcripts(self.dir) if transcripts else None
        self._key, created = load_or_create_audit_key(self.dir)
        self._lock = threading.Lock()
        self._fd = _open(self.path, os.O_RDWR | os.O_APPEND)
        self._head_fd = _open(self.head_path, os.O_RDWR)
        self._tail: tuple[int, int, str] | None = None  # (file size, seq, hash) after our last append
        if created:  # a log from before the key: vouch for it as it stands now (verify counts these records)
            with self._lock:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    seq, hash_ = self._read_tail()
                    if seq:
                        logger.warning("the audit log's %d records predate its key: from now on they are "
                                       "covered by the key, but were not authenticated when written", seq)  # fmt: skip
                        self._write_head(seq, hash_)
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

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
            last = parse_record(line)
            return last["seq"], last["hash"]
        except AuditError:
            logger.error("the last audit record is not valid; chaining on from its raw bytes (verify will fail)")
            return 0, hashlib.sha256(line).hexdigest()

    def _write_head(self, seq: int, hash_: str) -> None:
        text = f"{seq:020d} {hash_} {head_mac(self._key, seq, hash_)}\n".encode()
        os.pwrite(self._head_fd, text, 0)
        if os.fstat(self._head_fd).st_size != len(text):  # a shorter head from before the key
            os.ftruncate(self._head_fd, len(text))
        os.fsync(self._head_fd)

    def append(self, entry: dict) -> dict:
        """Add one record (the `entry` fields plus seq, prev, hash and mac), durably. Returns the record."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                seq, prev = self._read_tail()
                record = {"time": utc_timestamp(), **entry, "seq": seq + 1, "prev": prev}
                record.pop("hash", None), record.pop("mac", None)
                record["hash"] = record_hash(record)
                record["mac"] = record_mac(self._key, record["hash"])
                os.write(self._fd, canonical(record) + b"\n")
                os.fsync(self._fd)
                self._tail = (os.fstat(self._fd).st_size, record["seq"], record["hash"])
                self._write_head(record["seq"], record["hash"])
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
    """The Fernet key in `path`, created (mode 0600, atomically) on first use."""
    from cryptography.fernet import Fernet

    return create_once(path, lambda: Fernet.generate_key() + b"\n")[0].strip()


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
    """Every well-formed record in order (for `hearth audit show`; `verify_log` is the integrity check)."""
    path = os.path.join(audit_dir(home), LOG_NAME)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                yield parse_record(line.rstrip(b"\n"))
            except AuditError:
                continue


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A record count and the hash of that record: `SEQ:HASH`. The hash covers every record up to it, so a log that
    still holds record SEQ with this hash still holds records 1..SEQ unchanged. It carries no MAC, so it can be kept
    anywhere (a note, another machine) and checked without the key."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        m = re.fullmatch(r"\s*(\d{1,20}):([0-9a-fA-F]{64})\s*", text)
        if m is None:
            raise AuditError(f"{text.strip()[:100]!r} is not a checkpoint (SEQ:HASH, as `hearth audit checkpoint` "
                             "prints it)")  # fmt: skip
        return cls(int(m[1]), m[2].lower())


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    num_records: int
    head: str | None = None  # the last record's hash
    line: int | None = None  # first broken line (1-based)
    problem: str | None = None
    unauthenticated: int = 0  # records 1..this were written before the log had a key (see the module docstring)
    checkpoint: str | None = None  # SEQ:HASH of the last record, to keep elsewhere


def read_head(folder: str) -> tuple[int, str, str | None] | None:
    """(seq, hash, MAC or None for a head from before the key); None when missing or empty; seq -1 when garbled."""
    try:
        with open(os.path.join(folder, HEAD_NAME), "rb") as f:
            text = f.read().decode("ascii", "replace").split()
    except FileNotFoundError:
        return None
    if not text:
        return None
    if len(text) not in (2, 3) or not text[0].isdigit() or not all(_HEX64.fullmatch(t) for t in text[1:]):
        return -1, "", None
    return int(text[0]), text[1], text[2] if len(text) == 3 else None


def verify_log(home: str | None = None, against: Checkpoint | None = None) -> VerifyResult:
    """Walk the chain and check every MAC, the head and, if given, a checkpoint; the first problem found is reported,
    with its line number where it is one line's."""
    folder = audit_dir(home)
    path = os.path.join(folder, LOG_NAME)
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # writers hold it exclusively while they append and rewrite the head
            data = f.read()
            head = read_head(folder)
    except FileNotFoundError:
        data, head = b"", read_head(folder)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    elif data:
        return VerifyResult(False, len(lines) - 1, line=len(lines),
                            problem=f"line {len(lines)} is incomplete (cut short, or text appended)")  # fmt: skip
    try:
        key = read_audit_key(folder)
    except OSError as e:
        return VerifyResult(False, 0, problem=f"the audit key {os.path.join(folder, KEY_NAME)} cannot be read: "
                            f"{e.strerror}")  # fmt: skip
    except AuditError as e:
        return VerifyResult(False, 0, problem=str(e))
    prev, hashes = GENESIS, {}  # hash → line of each record, to name the line a broken link points back to
    seqs: dict[int, int] = {}
    chain: list[str] = []  # each line's hash
    unauthenticated = 0
    for n, raw in enumerate(lines, start=1):

        def broken(problem: str, n: int = n) -> VerifyResult:
            return VerifyResult(False, n - 1, line=n, problem=problem)

        try:
            record = parse_record(raw)
        except AuditError as e:
            return broken(f"line {n} is not an audit record: {e}")
        seq, rec_prev, rec_hash, mac = record["seq"], record["prev"], record["hash"], record.get("mac")
        if record_hash(record) != rec_hash:
            return broken(f"line {n} (record {seq}) was edited: its content does not match its hash")
        if mac is None:
            if chain and unauthenticated < len(chain):
                return broken(f"line {n} (record {seq}) has no MAC although the records before it have one: it was "
                              "added or rewritten without the audit key")  # fmt: skip
            unauthenticated += 1
        elif key is None:
            return broken(f"line {n} (record {seq}) has a MAC but there is no audit key ({KEY_NAME}) to check it: "
                          "the key was removed")  # fmt: skip
        elif not hmac.compare_digest(mac, record_mac(key, rec_hash)):
            return broken(f"line {n} (record {seq}) has a wrong MAC: it was written or rewritten without this log's "
                          "audit key")  # fmt: skip
        if seq != n:
            if seq in seqs:
                what = (f"a second record {seq} (line {seqs[seq]} holds one too): a record was inserted at line "
                        f"{seqs[seq]} or {n}, or records were duplicated")  # fmt: skip
            elif seq > n:
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
        chain.append(rec_hash)
        prev = rec_hash
    num = len(lines)

    def fails(problem: str, line: int | None = None) -> VerifyResult:
        return VerifyResult(False, num, line=line, problem=problem, unauthenticated=unauthenticated)

    if head is None:
        if num:
            return fails("the head file audit/head is missing or empty")
    else:
        head_seq, head_hash, mac = head
        if head_seq < 0:
            return fails("the head file audit/head is not readable")
        if key is None:
            if mac is not None:
                return fails(f"the head file has a MAC but there is no audit key ({KEY_NAME}) to check it: the key "
                             "was removed")  # fmt: skip
        elif mac is None:
            return fails("the head file audit/head has no MAC: it was rewritten without the audit key")
        elif not hmac.compare_digest(mac, head_mac(key, head_seq, head_hash)):
            return fails("the head file audit/head has a wrong MAC: it was rewritten without the audit key (to "
                         "hide records cut from the end, or added)")  # fmt: skip
        if head_seq > num:
            removed = f"record {head_seq} was" if head_seq == num + 1 else f"records {num + 1} to {head_seq} were"
            return fails(f"line {num + 1} is missing: the log ends at record {num} but the head says {head_seq}: "
                         f"{removed} removed from the end", num + 1)  # fmt: skip
        if head_seq >= 1 and chain[head_seq - 1] != head_hash:
            return fails(f"line {head_seq} (record {head_seq}) does not match the head hash: the records from there "
                         "on were rewritten", head_seq)  # fmt: skip
        if head_seq == 0 and num:
            return fails("the head says the log is empty but it holds records")
        if key is not None and unauthenticated > head_seq:  # past the head, only a MAC vouches for a record
            return fails(f"line {head_seq + 1} (record {head_seq + 1}) has no MAC and comes after the head: it was "
                         "added without the audit key", head_seq + 1)  # fmt: skip
    if key is None and num:
        return fails(f"none of the {num} records is authenticated: there is no audit key ({KEY_NAME}). A log from "
                     "before hearth kept one gets it the next time `hearth serve` opens it; otherwise the key was "
                     "deleted")  # fmt: skip
    if against is not None:
        if against.seq > num:
            return fails(f"line {num + 1} is missing: the log ends at record {num} but the checkpoint is at record "
                         f"{against.seq}: records were removed below the checkpoint", num + 1)  # fmt: skip
        if (chain[against.seq - 1] if against.seq else GENESIS) != against.hash:
            return fails(f"line {against.seq} (record {against.seq}) does not match the checkpoint: the log was "
                         f"rewritten at or before record {against.seq}", against.seq or None)  # fmt: skip
    return VerifyResult(True, num, head=prev if num else None, unauthenticated=unauthenticated,
                        checkpoint=str(Checkpoint(num, prev)) if num else None)  # fmt: skip


def checkpoint(home: str | None = None) -> Checkpoint:
    """The log's current end as a checkpoint, once the log verifies."""
    result = verify_log(home)
    if not result.ok:
        raise AuditError(f"the audit log does not verify, so no checkpoint: {result.problem}")
    if not result.num_records:
        raise AuditError("the audit log is empty: nothing to checkpoint yet")
    return Checkpoint.parse(result.checkpoint or "")
