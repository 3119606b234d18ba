"""API keys: created once, stored as salted scrypt hashes in `$HEARTH_HOME/keys` (JSON, file mode 0600).

A key reads `hk_<id>_<secret>`: the 8-hex-digit id finds the record (ids are not secret: they appear in the audit
log), the 256-bit secret is checked against the record's scrypt hash with `hmac.compare_digest`. Writes are atomic
(temporary file, fsync, rename) under an flock, so two `hearth keys` commands cannot lose each other's changes.
A running server rereads the file when it changes, so `create` and `revoke` take effect without a restart.
Stdlib only: `hearth keys` must not import torch.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

KEY_PREFIX = "hk"
SCOPES = ("chat", "admin")
# scrypt cost: ~16 MiB and ~50-100 ms per hash here. The secret has 256 bits, so the KDF is defence in depth for a
# leaked keys file; a server verifies each key once per process and remembers the result (see KeyStore.verify).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
FILE_MODE = 0o600


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


def _read_records(path: str) -> list[KeyRecord]:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except FileNotFoundError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users (mode %o); run chmod 600 on it", path, stat.S_IMODE(mode))
    try:
        data = json.loads(raw)
        return [KeyRecord(**r) for r in data["keys"]]
    except (ValueError, KeyError, TypeError) as e:
        raise KeyStoreError(f"{path}: not a valid keys file ({e})") from None


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
    error: str | None = None  # why not, for the 401 message


class KeyStore:
    """The server's view of `$HEARTH_HOME/keys`, reread whenever the file changes. Thread-safe."""

    def __init__(self, home: str | None = None) -> None:
        self.path = keys_path(home)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._records: dict[str, KeyRecord] = {}
        # verified keys: HMAC(process secret, presented key) → key id, so scrypt runs once per key per process
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[bytes, str] = {}

    def records(self) -> dict[str, KeyRecord]:
        try:
            st = os.stat(self.path)
            stamp: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._records = {r.id: r for r in _read_records(self.path)} if stamp else {}
                self._verified.clear()  # a revoked or replaced key must be checked again
                self._stamp = stamp
            return self._records

    def has_keys(self) -> bool:
        """Any key on file, even revoked or expired: then every protected route needs one (revoking the last key
        locks the server, it never opens it)."""
        return bool(self.records())

    def has_active_keys(self) -> bool:
        return any(r.status == "active" for r in self.records().values())

    def verify(self, key: str) -> AuthResult:
        """Check a presented key. Slow (scrypt) the first time a key is seen: call it off the event loop."""
        records = self.records()
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
