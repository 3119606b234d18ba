"""The ASGI middleware that enforces keys and limits and writes the audit record of each request.

Order of checks: public paths pass; otherwise, when keys exist (or a key is required), `Authorization: Bearer` must
hold a good key (401), admin paths need an admin key (403), and the key's per-minute limits must have room (429).
After the response has gone out, the request's token counts (left in `scope["state"]["usage"]` by the handlers) are
charged to the key's token limit and the audit record is written in a worker thread. The key id is left in
`scope["state"]["key_id"]` for other per-request bookkeeping.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.api.errors import error_response
from hearth.governance.audit import AuditLog, utc_timestamp
from hearth.governance.keys import KeyStore
from hearth.governance.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

# reachable without a key, and not audited: liveness, and the web chat page (which asks for a key itself)
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# need a key with the admin scope
ADMIN_PATHS = frozenset({"/metrics"})
MISSING_KEY = "missing API key: send the header `Authorization: Bearer <key>` (keys are made with `hearth keys create`)"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class GovernanceMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore | None = None, audit: AuditLog | None = None,
                 limiter: RateLimiter | None = None, require_key: bool = False,
                 served_model_name: str | None = None, ledger: Any = None) -> None:  # fmt: skip
        self.app = app
        self.keys = keys
        self.audit = audit
        self.ledger = ledger  # accounting.usage.UsageLedger: tokens and busy time for `hearth usage`
        self.limiter = limiter or RateLimiter()
        self.require_key = require_key
        self.served_model_name = served_model_name

    async def authorize(self, scope: Scope, path: str) -> tuple[Any, Any]:
        """(key record or None, refusal response or None)."""
        if self.keys is None:
            if self.require_key:
                return None, error_response("this server requires an API key, but no key store is configured", 401)
            return None, None
        if not (self.require_key or self.keys.has_keys()):
            return None, None
        token = bearer_token(scope)
        headers = {"WWW-Authenticate": "Bearer"}
        if not token:
            message = MISSING_KEY if token is None else "malformed Authorization header: expected `Bearer <key>`"
            return None, error_response(message, 401, code="invalid_api_key", headers=headers)
        result = await anyio.to_thread.run_sync(self.keys.verify, token)  # scrypt, the first time: off the loop
        record = result.record
        if record is None:
            return None, error_response(result.error or "invalid API key", 401, code="invalid_api_key",
                                        headers=headers)  # fmt: skip
        if path in ADMIN_PATHS and record.scope != "admin":
            return record, error_response(f"API key {record.id} has scope {record.scope!r}; {path} needs an admin key",
                                          403, code="insufficient_scope")  # fmt: skip
        refusal = self.limiter.admit(record.id, record.rpm, record.tpm)
        if refusal is not None:
            return record, error_response(refusal.message, 429, code="rate_limit_exceeded",
                                          headers={"Retry-After": str(refusal.retry_after)})  # fmt: skip
        return record, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or is_public(path):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500
        transcripts = self.audit is not None and self.audit.transcripts is not None
        request_chunks: list[bytes] = []
        response_chunks: list[bytes] = []

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_chunks.append(message.get("body", b""))
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and transcripts:
                response_chunks.append(message.get("body", b""))
            await send(message)

        record = None
        try:
            record, refusal = await self.authorize(scope, path)
            if record is not None:
                state["key_id"] = record.id
            if refusal is not None:
                transcripts = False  # nothing reached the model
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, tracked_receive if transcripts else receive, tracked_send)
        finally:
            with anyio.CancelScope(shield=True):  # the record is written even if the client went away
                usage = state.get("usage")
                if record is not None and record.tpm is not None and usage is not None:
                    self.limiter.charge(record.id, usage.prompt_tokens + usage.completion_tokens)
                if self.ledger is not None and usage is not None and status == 200:
                    await anyio.to_thread.run_sync(self.record_usage, usage, record, start)
                if self.audit is not None:
                    entry = self.entry(scope, state, record, status, time.perf_counter() - start, transcripts)
                    bodies = (b"".join(request_chunks), b"".join(response_chunks)) if transcripts else None
                    try:
                        await anyio.to_thread.run_sync(self.write, entry, bodies)
                    except Exception:
                        logger.exception("could not write the audit record of %s", entry["request_id"])

    def entry(self, scope: Scope, state: dict, record: Any, status: int, latency: float, transcripts: bool) -> dict:
        usage = state.get("usage")
        client = scope.get("client")
        reasons = [] if usage is None else [r or "" for _, r in sorted(usage.finish_reasons.items())]
        return {
            "time": utc_timestamp(),
            "request_id": getattr(usage, "request_id", None) or f"req-{uuid.uuid4().hex}",
            "key_id": record.id if record is not None else None,
            "client": client[0] if client else None,
            "method": scope.get("method"),
            "endpoint": scope.get("path"),
            "model": self.served_model_name if usage is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
            "completion_tokens": usage.completion_tokens if usage is not None else 0,
            "cached_tokens": sum(usage.cached.values()) if usage is not None else 0,
            "status": status,
            "latency_ms": round(latency * 1000, 1),
            "finish_reason": ",".join(reasons) if reasons else None,
            "transcript": transcripts,
        }

    def record_usage(self, usage: Any, record: Any, start: float) -> None:
        duration = time.perf_counter() - start
        try:
            self.ledger.record(self.served_model_name, record.id if record is not None else None, usage.prompt_tokens,
                               sum(usage.cached.values()), usage.completion_tokens, usage.reasoning_tokens,
                               time.time() - duration, duration)  # fmt: skip
        except Exception:
            logger.exception("could not write the usage record")

    def write(self, entry: dict, bodies: tuple[bytes, bytes] | None) -> None:
        assert self.audit is not None
        self.audit.append(entry)
        if bodies is not None and self.audit.transcripts is not None:
            self.audit.transcripts.save(entry["request_id"], *bodies)
