"""The ASGI middleware that enforces keys and limits and writes the audit record of each request.

Order of checks: public paths pass; otherwise, when the key store is locked (it has seen a key, see keys.py) or a key is
required, `Authorization: Bearer` (or `x-api-key`, the header Anthropic's clients send) must hold a good key (401; 503
while the keys file cannot be read), admin paths need an admin key (403), and the key's per-minute limits must have room
(429). Anything unexpected while checking a key refuses the request (503): the check fails closed. Refusals take the
error shape of the route asked for (errors.py: Anthropic's under /v1/messages, OpenAI's elsewhere).

Token limits (see ratelimit.py): for a key with a token limit, the middleware leaves a hook in the request's state,
`scope["state"]["reserve_tokens"]`, a callable that takes the request's TokenAsk, reserves its tokens and returns the
max_tokens to run with (the grant when the request had none), or raises TokenLimitExceeded. The routes that run the
model call it once they have tokenized the prompt and checked its length, and before they submit anything to the
engine, so the count is exact and tokenizing happens once, in the routes. The middleware neither reads nor changes the
body: a request that never calls the hook (GET /v1/models, a body the route refuses) reserves nothing.

After the response has gone out, the request's token counts (left in `scope["state"]["usage"]` by the handlers)
settle the reservation made through the hook: charged in full, the unused rest released. A request that ends without
counts (a refusal, an engine error before the first token) used nothing; one whose client went away before its
response began is charged its prompt, which the model may have read. Then the audit record is written in a worker
thread. The key id is left in `scope["state"]["key_id"]` for other per-request bookkeeping.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.governance.audit import AuditLog, utc_timestamp
from hearth.governance.errors import error_response
from hearth.governance.keys import KEYS_UNAVAILABLE, KeyStore
from hearth.governance.ratelimit import RateLimiter, Refusal, Reservation, TokenAsk, TokenLimitExceeded

logger = logging.getLogger(__name__)

# reachable without a key, and not audited: liveness, and the web chat page (which asks for a key itself)
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# need a key with the admin scope
ADMIN_PATHS = frozenset({"/metrics"})
MISSING_KEY = (
    "missing API key: send the header `Authorization: Bearer <key>` or `X-Api-Key: <key>` (keys are made "
    "with `hearth keys create`)"
)
CLIENT_CLOSED = 499


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    """The key presented: `Authorization: Bearer <key>`, else `x-api-key: <key>` (Anthropic's header); "" for a
    malformed or empty header, None for neither."""
    api_key = None
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
        if name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip()
    return api_key


def keys_unavailable(path: str | None = None) -> Any:
    return error_response(KEYS_UNAVAILABLE, 503, code="keys_unavailable", path=path)


class TokenHook:
    """`scope["state"]["reserve_tokens"]` for a request made with a key that has a token limit: reserves the request's
    tokens once and returns the max_tokens to run with, or raises TokenLimitExceeded. The middleware settles what it
    reserved when the request ends; after that it reserves nothing more."""

    def __init__(self, limiter: RateLimiter, key_id: str, tpm: int) -> None:
        self.limiter = limiter
        self.key_id = key_id
        self.tpm = tpm
        self.reservation: Reservation | None = None
        self.closed = False

    def __call__(self, ask: TokenAsk) -> int:
        if self.closed or self.reservation is not None:
            raise RuntimeError("a request reserves its tokens once, before it ends")
        result = self.limiter.reserve(self.key_id, self.tpm, ask)
        if isinstance(result, Refusal):
            raise TokenLimitExceeded(result.message, result.retry_after)
        self.reservation = result
        return result.max_tokens


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
                return None, error_response("this server requires an API key, but no key store is configured", 401,
                                            path=path)  # fmt: skip
            return None, None
        locked, problem = self.keys.state()
        if not (self.require_key or locked):
            return None, None
        if problem is not None:
            return None, keys_unavailable(path)
        token = bearer_token(scope)
        headers = {"WWW-Authenticate": "Bearer"}
        if not token:
            message = MISSING_KEY if token is None else "malformed Authorization header: expected `Bearer <key>`"
            return None, error_response(message, 401, code="invalid_api_key", headers=headers, path=path)
        result = await anyio.to_thread.run_sync(self.keys.verify, token)  # scrypt, the first time: off the loop
        record = result.record
        if record is None:
            if result.status == 503:
                return None, keys_unavailable(path)
            return None, error_response(result.error or "invalid API key", 401, code="invalid_api_key",
                                        headers=headers, path=path)  # fmt: skip
        if path in ADMIN_PATHS and record.scope != "admin":
            return record, error_response(f"API key {record.id} has scope {record.scope!r}; {path} needs an admin key",
                                          403, code="insufficient_scope", path=path)  # fmt: skip
        return record, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or is_public(path):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500
        started = False
        transcripts = self.audit is not None and self.audit.transcripts is not None
        request_chunks: list[bytes] = []
        response_chunks: list[bytes] = []

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_chunks.append(message.get("body", b""))
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body" and transcripts:
                response_chunks.append(message.get("body", b""))
            await send(message)

        record = None
        hook: TokenHook | None = None
        try:
            app_receive = tracked_receive if transcripts else receive
            try:
                record, refusal = await self.authorize(scope, path)
                if record is not None:
                    state["key_id"] = record.id
                if refusal is None and record is not None:
                    rpm_refusal = self.limiter.admit(record.id, record.rpm)
                    if rpm_refusal is not None:
                        refusal = error_response(rpm_refusal.message, 429, code="rate_limit_exceeded",
                                                 headers={"Retry-After": str(rpm_refusal.retry_after)},
                                                 path=path)  # fmt: skip
                    elif record.tpm is not None:
                        hook = state["reserve_tokens"] = TokenHook(self.limiter, record.id, record.tpm)
            except Exception as e:  # a check that cannot finish refuses the request
                # where, not the message nor a traceback's text: either could quote the presented key
                where = traceback.extract_tb(e.__traceback__)[-1]
                logger.error("could not check the key or limits of a request to %s: %s at %s:%d", path,
                             type(e).__name__, where.filename, where.lineno)  # fmt: skip
                refusal = (keys_unavailable(path) if record is None
                           else error_response("internal server error", 500, path=path))  # fmt: skip
            if refusal is not None:
                transcripts = False  # nothing reached the model
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, app_receive, tracked_send)
        finally:
            with anyio.CancelScope(shield=True):  # the record is written even if the client went away
                usage = state.get("usage")
                if hook is not None:
                    hook.closed = True
                    reservation = hook.reservation
                    if reservation is not None:
                        if usage is not None:
                            used = usage.prompt_tokens + usage.completion_tokens
                        else:  # gone before its response began: the model may have read the prompt
                            used = reservation.prompt_tokens if status == CLIENT_CLOSED or not started else 0
                        self.limiter.settle(reservation, used)
                if self.ledger is not None and usage is not None and status == 200:
                    model = state.get("model") or self.served_model_name
                    await anyio.to_thread.run_sync(self.record_usage, usage, record, start, model)
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
            "model": (state.get("model") or self.served_model_name) if usage is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
            "completion_tokens": usage.completion_tokens if usage is not None else 0,
            "cached_tokens": sum(usage.cached.values()) if usage is not None else 0,
            "status": status,
            "latency_ms": round(latency * 1000, 1),
            "finish_reason": ",".join(reasons) if reasons else None,
            "transcript": transcripts,
        }

    def record_usage(self, usage: Any, record: Any, start: float, model: str | None = None) -> None:
        duration = time.perf_counter() - start
        try:
            self.ledger.record(model or self.served_model_name, record.id if record is not None else None, usage.prompt_tokens,
                               sum(usage.cached.values()), usage.completion_tokens, usage.reasoning_tokens,
                               time.time() - duration, duration)  # fmt: skip
        except Exception:
            logger.exception("could not write the usage record")

    def write(self, entry: dict, bodies: tuple[bytes, bytes] | None) -> None:
        assert self.audit is not None
        self.audit.append(entry)
        if bodies is not None and self.audit.transcripts is not None:
            self.audit.transcripts.save(entry["request_id"], *bodies)
