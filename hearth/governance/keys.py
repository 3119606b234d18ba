"""API keys: created once, stored as salted scrypt hashes in `$HEARTH_HOME/keys` (JSON, file mode 0600).

A key reads `hk_<id>_<secret>`: the 8-hex-digit id finds the record (ids are not secret: they appear in the audit
log), the 256-bit secret is checked against the record's scrypt hash with `hmac.compare_digest`. Writes are atomic
(temporary file, fsync, rename) under an flock, so two `hearth keys` commands cannot lose each other's changes.
A running server rereads the file when it changes, so `create` and `revoke` take effect without a restart.
Stdlib only: `hearth keys` must not import torch.

A server fails closed on its keys file. It is open (on loopback) only while it has never seen a key: once the file
has held a key, or could not be read, the KeyStore is *locked* for the life of the process. A locked store with no
usable key file refuses every request that needs a key: the file removed or holding no keys gives 401 (no key is
valid), a file that cannot be read or is not a valid keys file (garbage, truncated, wrong shape, a directory) gives
503. Each change of state is logged once (never a key, never a file's bytes), and a valid file coming back restores
service. A keys file that appears while an open server runs locks it from the next request on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

KEY_PREFIX = "hk"
SCOPES = ("chat", "admin")
# scrypt cost: 16 MiB (128·N·r bytes) per hash, and CPU time to match. The secret has 256 bits, so the KDF is defence
# in depth for a leaked keys file; a server verifies each key once per process and remembers the result (see
# KeyStore.verify).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
FILE_MODE = 0o600
RECHECK_SECONDS = 2.0  # a running server rereads a keys file changed this recently on every request


class KeyStoreError(ValueError):
    """A user-facing key-management failure (unknown key, bad expiry, ...)."""


@dataclass(slots=True)
class KeyRecord:
    """One key as stored: never the key itself, only its id, salt and scrypt hash."""

    id: str
    name: str
    scope: str
    salt: str  # hex
    hash: str  # hex scrypt(secret, salt)
    kdf: dict = field(default_factory=lambda: {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
    created: str = ""  # ISO 8601 UTC
    expires: str | None = None  # ISO 8601 UTC
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    revoked: str | None = None  # ISO 8601 UTC time of revocation

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or utcnow()) >= parse_time(self.expires)

    @property
    def status(self) -> str:
        if self.revoked:
            return "revoked"
        return "expired" if self.is_expired() else "active"

    def public(self) -> dict:
        """What `hearth keys list --json` shows: everything but the salt and hash."""
        out = asdict(self)
        for secret_field in ("salt", "hash", "kdf"):
            out.pop(secret_field)
        out["status"] = self.status
        return out


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; a naive value is taken as UTC, a bare date as its midnight UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise KeyStoreError(f"cannot read the time {text!r} (try 2026-12-31 or 2026-12-31T18:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def hash_secret(secret: str, salt: bytes, kdf: dict) -> bytes:
    if kdf.get("name") != "scrypt":
        raise KeyStoreError(f"unknown key hash {kdf.get('name')!r}")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=32)


def split_key(key: str) -> tuple[str, str] | None:
    """`hk_<id>_<secret>` → (id, secret), or None when the text is not shaped like a Hearth key."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 8 or not parts[2]:
        return None
    return parts[1], parts[2]


def keys_path(home: str | None = None) -> str:
    return os.path.join(home or hearth_home(), "keys")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on `<path>.lock`: serialises writers across processes."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data`: a fresh file created with `mode` (never wider), fsynced, renamed over it."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; it can never widen it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_records(path: str, warn_mode: bool = True) -> list[KeyRecord]:
    """The records in `path` ([] when there is no file). KeyStoreError when the file cannot be read or is not a valid
    keys file; the message names the file and what is wrong, never the file's bytes."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:  # unreadable, a directory, an I/O error
        raise KeyStoreError(f"{path}: cannot read the keys file ({type(e).__name__}: {e.strerror or e})") from None
    if warn_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users (mode %o); run chmod 600 on it", path, stat.S_IMODE(mode))
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = "not UTF-8 JSON" if isinstance(e, ValueError) else "JSON nested too deeply"
        raise KeyStoreError(f"{path}: not a valid keys file ({reason})") from None
    try:
        return parse_records(data)
    except KeyStoreError as e:
        raise KeyStoreError(f"{path}: not a valid keys file ({e})") from None


_FIELDS = {f for f in KeyRecord.__dataclass_fields__}
_REQUIRED = {"id", "name", "scope", "salt", "hash"}


def _check_hex(value: object, label: str) -> None:
    if not isinstance(value, str) or not value:
        raise KeyStoreError(f"{label} is not a hex string")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise KeyStoreError(f"{label} is not a hex string") from None


def _check_record(r: object, i: int) -> KeyRecord:
    """One record, every field checked for type and range, so a running server never trips over a field later."""
    where = f"key {i}"
    if not isinstance(r, dict):
        raise KeyStoreError(f"{where} is not an object")
    unknown, missing = set(r) - _FIELDS, _REQUIRED - set(r)
    if unknown or missing:
        what = f"{len(unknown)} unknown fields" if unknown else f"missing fields {sorted(missing)}"  # never the file's text
        raise KeyStoreError(f"{where}: {what}")
    key_id = r["id"]
    if not (isinstance(key_id, str) and len(key_id) == 8 and all(c in "0123456789abcdef" for c in key_id)):
        raise KeyStoreError(f"{where}: id is not 8 hex digits")
    where = f"key {key_id}"
    if not isinstance(r["name"], str):
        raise KeyStoreError(f"{where}: name is not a string")
    if r["scope"] not in SCOPES:
        raise KeyStoreError(f"{where}: scope is not one of {', '.join(SCOPES)}")
    _check_hex(r["salt"], f"{where}: salt")
    _check_hex(r["hash"], f"{where}: hash")
    kdf = r.get("kdf", {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
    ints = isinstance(kdf, dict) and all(type(kdf.get(k)) is int for k in "nrp")
    if not (ints and kdf.get("name") == "scrypt" and set(kdf) == {"name", "n", "r", "p"}):
        raise KeyStoreError(f"{where}: kdf is not scrypt with integer n, r, p")
    n, r_, p = kdf["n"], kdf["r"], kdf["p"]
    # bounded so that a hostile file cannot make each check take gigabytes
    if not (n >= 2 and n & (n - 1) == 0 and r_ >= 1 and 1 <= p <= 16 and n * r_ <= 2**20):
        raise KeyStoreError(f"{where}: kdf parameters out of range")
    for name in ("created", "expires", "revoked"):
        value = r.get(name)
        if value is not None and not isinstance(value, str):
            raise KeyStoreError(f"{where}: {name} is not a string")
    if r.get("expires") is not None:
        try:
            parse_time(r["expires"])
        except KeyStoreError:
            raise KeyStoreError(f"{where}: expires is not an ISO 8601 time") from None
    for name in ("rpm", "tpm"):
        value = r.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise KeyStoreError(f"{where}: {name} is not a whole number of at least 1")
    return KeyRecord(**r)


def parse_records(data: object) -> list[KeyRecord]:
    """The records of a parsed keys file, or KeyStoreError naming the first thing wrong (never a value)."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyStoreError('expected an object with a "keys" list')
    records = [_check_record(r, i) for i, r in enumerate(data["keys"])]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise KeyStoreError("two keys share an id")
    return records


def _write_records(path: str, records: list[KeyRecord]) -> None:
    data = json.dumps({"version": 1, "keys": [asdict(r) for r in records]}, indent=1).encode() + b"\n"
    atomic_write(path, data)


def create_key(name: str, scope: str = "chat", rpm: int | None = None, tpm: int | None = None,
               expires: str | None = None, home: str | None = None) -> tuple[str, KeyRecord]:  # fmt: skip
    """Make a new key; returns (the key, to show once, and its stored record)."""
    if scope not in SCOPES:
        raise KeyStoreError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise KeyStoreError(f"--{label} must be at least 1, got {value}")
    if not name.strip():
        raise KeyStoreError("a key needs a non-empty --name")
    expires_at = None
    if expires is not None:
        when = parse_time(expires)
        if when <= utcnow():
            raise KeyStoreError(f"--expires {expires} is already in the past")
        expires_at = format_time(when)
    path = keys_path(home)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    kdf = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    digest = hash_secret(secret, salt, kdf)
    with _locked(path):
        records = _read_records(path)
        taken = {r.id for r in records}
        key_id = secrets.token_hex(4)
        while key_id in taken:
            key_id = secrets.token_hex(4)
        record = KeyRecord(id=key_id, name=name, scope=scope, salt=salt.hex(), hash=digest.hex(), kdf=kdf,
                           created=format_time(utcnow()), expires=expires_at, rpm=rpm, tpm=tpm)  # fmt: skip
        _write_records(path, records + [record])
    logger.debug("created key %s (%s, scope %s)", key_id, name, scope)
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def list_keys(home: str | None = None) -> list[KeyRecord]:
    return _read_records(keys_path(home))


def revoke_key(id_or_name: str, home: str | None = None) -> KeyRecord:
    """Mark a key revoked (the record stays, so audit records keep a meaning). Matches the id, or a unique name."""
    path = keys_path(home)
    with _locked(path):
        records = _read_records(path)
        matches = [r for r in records if r.id == id_or_name] or [r for r in records if r.name == id_or_name]
        if not matches:
            raise KeyStoreError(f"no key with id or name {id_or_name!r} (see `hearth keys list`)")
        if len(matches) > 1:
            raise KeyStoreError(f"{len(matches)} keys are named {id_or_name!r}; revoke by id: "
                            f"{', '.join(r.id for r in matches)}")  # fmt: skip
        record = matches[0]
        if record.revoked is None:
            record.revoked = format_time(utcnow())
            _write_records(path, records)
    return record


@dataclass(slots=True)
class AuthResult:
    record: KeyRecord | None  # set when the key is good
    error: str | None = None  # why not, for the refusal's message
    status: int = 401  # 401: a bad key; 503: the keys file cannot be used


KEYS_UNAVAILABLE = "the server cannot read its API keys file, so it refuses every request; retry later or tell its operator"


class KeyStore:
    """The server's view of `$HEARTH_HOME/keys`, reread whenever the file changes. Thread-safe.

    Fails closed (see the module docstring): `locked` turns on once a key or an unusable file has been seen and never
    turns off; `problem` says why the file cannot be used right now.
    """

    def __init__(self, home: str | None = None) -> None:
        self.path = keys_path(home)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._records: dict[str, KeyRecord] = {}
        self._problem: str | None = None
        self._locked = False
        self._loaded = False
        self._recheck_until = 0.0
        # verified keys: HMAC(process secret, presented key) → key id, so scrypt runs once per key per process
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[bytes, str] = {}
        self._refresh()  # a server that starts with keys is locked from the start, even if the file goes at once

    def _refresh(self) -> tuple[dict[str, KeyRecord], str | None, bool]:
        """(records, problem, locked), rereading the file when its inode, size, mode, mtime or ctime changed, and on
        every call while its mtime is recent (a change within the file system's timestamp granularity, which can be
        milliseconds, would leave the stamp as it was)."""
        try:
            st = os.stat(self.path)
            stamp: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode)
        except FileNotFoundError:
            stamp = None
        except OSError as e:  # e.g. $HEARTH_HOME made unreadable or replaced by a file
            stamp = ("error", type(e).__name__)
        with self._lock:
            if not self._loaded or stamp != self._stamp or time.time() < self._recheck_until:
                self._load(stamp)
            return self._records, self._problem, self._locked

    def _state(self) -> tuple:
        if self._problem is not None:
            return ("unusable", self._problem)
        if self._records:
            return ("keys",)
        return ("no keys",) if self._locked else ("open",)

    def _load(self, stamp: tuple | None) -> None:
        """Reread the file (the lock is held); log a change of state once."""
        before, first = self._state(), not self._loaded
        records: dict[str, KeyRecord] = {}
        problem = None
        try:
            if isinstance(stamp, tuple) and stamp[:1] == ("error",):
                raise KeyStoreError(f"{self.path}: cannot read the keys file ({stamp[1]})")
            if stamp is not None:  # the mode warning once per change, not on each recheck of a recent file
                records = {r.id: r for r in _read_records(self.path, warn_mode=stamp != self._stamp)}
        except KeyStoreError as e:
            problem = str(e)
        if records != self._records:
            self._records = records
            self._verified.clear()  # a revoked or replaced key must be checked again
        self._problem, self._stamp, self._loaded = problem, stamp, True
        self._locked = self._locked or bool(records) or problem is not None
        recent = isinstance(stamp, tuple) and isinstance(stamp[1], int)
        self._recheck_until = stamp[1] / 1e9 + RECHECK_SECONDS if recent else 0.0
        after = self._state()
        if after == before and not first:
            return
        if after[0] == "unusable":
            logger.error("%s; every request that needs an API key is refused (503) until the file is fixed", problem)
        elif after[0] == "no keys":
            what = "is gone" if stamp is None else "holds no keys"
            logger.error("%s %s, but this server requires API keys: every request that needs one is refused (401) "
                         "until keys are back", self.path, what)  # fmt: skip
        elif before[0] in ("unusable", "no keys") and not first:
            logger.warning("%s is usable again (%d keys)", self.path, len(records))
        elif before[0] == "open" and after[0] == "keys" and not first:
            logger.warning("%s now holds API keys: every route but /health and the web page needs one from now on",
                           self.path)  # fmt: skip

    def records(self) -> dict[str, KeyRecord]:
        """The records on file; raises KeyStoreError when the file cannot be used."""
        records, problem, _ = self._refresh()
        if problem is not None:
            raise KeyStoreError(problem)
        return records

    def state(self) -> tuple[bool, str | None]:
        """(locked, problem): whether requests need a key, and why none can be checked now (None: they can)."""
        _, problem, locked = self._refresh()
        return locked, problem

    def has_keys(self) -> bool:
        """Any key on file, even revoked or expired: then every protected route needs one. Raises KeyStoreError when
        the file cannot be used (`hearth serve` refuses to start on it)."""
        return bool(self.records())

    def has_active_keys(self) -> bool:
        return any(r.status == "active" for r in self.records().values())

    def verify(self, key: str) -> AuthResult:
        """Check a presented key. Slow (scrypt) the first time a key is seen: call it off the event loop."""
        records, problem, _ = self._refresh()
        if problem is not None:
            return AuthResult(None, KEYS_UNAVAILABLE, 503)
        parts = split_key(key)
        if parts is None:
            return AuthResult(None, "invalid API key")
        key_id, secret = parts
        record = records.get(key_id)
        if record is None:
            return AuthResult(None, "invalid API key")
        tag = hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()
        with self._lock:
            known = self._verified.get(tag) == key_id
        if not known:
            try:
                digest = hash_secret(secret, bytes.fromhex(record.salt), record.kdf)
            except (KeyStoreError, ValueError) as e:
                logger.error("key %s: cannot check it: %s", key_id, e)
                return AuthResult(None, "invalid API key")
            if not hmac.compare_digest(digest, bytes.fromhex(record.hash)):
                return AuthResult(None, "invalid API key")
            with self._lock:
                if self._records.get(key_id) is record:  # not replaced by a reload meanwhile
                    self._verified[tag] = key_id
        if record.revoked:
            return AuthResult(None, f"API key {key_id} has been revoked")
        if record.is_expired():
            return AuthResult(None, f"API key {key_id} expired at {record.expires}")
        return AuthResult(record)
