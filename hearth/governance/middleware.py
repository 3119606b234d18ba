"""The ASGI middleware that enforces keys and limits and writes the audit record of each request.

Order of checks: public paths pass; otherwise, when the key store is locked (it has seen a key, see keys.py) or a key is
required, `Authorization: Bearer` must hold a good key (401; 503 while the keys file cannot be read), admin paths need
an admin key (403), and the key's per-minute limits must have room (429). Anything unexpected while checking a key
refuses the request (503): the check fails closed.

Token limits reserve before the model runs (see ratelimit.py). For a key with a token limit, the middleware reads the
body of a generating request (POST /v1/chat/completions or /v1/completions, at most the app's body limit) and works out
its prompt tokens with the routes' own code (the chat template, the tokenizer), so the reservation is exact rather than
guessed from the body size; the routes tokenize again, which is the price of knowing the count before admission. A
request the route would refuse before generating (not ready, unknown model, prompt too long) gets the route's own
error here; a body the route cannot parse reserves nothing. A request without max_tokens (max_completion_tokens for
chat) is granted what the key has left, and the body handed to the route carries that grant as its max_tokens (the
audit transcript keeps the body as sent).

After the response has gone out, the request's token counts (left in `scope["state"]["usage"]` by the handlers)
settle its reservation: charged in full, the unused rest released. A request that ends without counts (a refusal, an
engine error before the first token) used nothing; one whose client went away before its response began is charged
its prompt, which the model may have read. Then the audit record is written in a worker thread. The key id is left in
`scope["state"]["key_id"]` for other per-request bookkeeping.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.api.errors import DEFAULT_MAX_BODY_BYTES, APIError, BodyTooLarge, error_response
from hearth.governance.audit import AuditLog, utc_timestamp
from hearth.governance.keys import KEYS_UNAVAILABLE, KeyStore
from hearth.governance.ratelimit import RateLimiter, Refusal, Reservation, TokenAsk

logger = logging.getLogger(__name__)

# reachable without a key, and not audited: liveness, and the web chat page (which asks for a key itself)
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# need a key with the admin scope
ADMIN_PATHS = frozenset({"/metrics"})
# the routes that run the model; the field that caps a completion's tokens in each
GENERATING_PATHS = {"/v1/chat/completions": "max_completion_tokens", "/v1/completions": "max_tokens"}
MISSING_KEY = "missing API key: send the header `Authorization: Bearer <key>` (keys are made with `hearth keys create`)"
CLIENT_CLOSED = 499


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def keys_unavailable() -> Any:
    return error_response(KEYS_UNAVAILABLE, 503, code="keys_unavailable")


class _ClientGone(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge past `limit` bytes, _ClientGone if the client disconnects first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def token_ask(scope: Scope, path: str, body: bytes) -> tuple[TokenAsk, dict] | None:
    """(what the request may use, its parsed body), or None when the route will refuse the body as invalid before it
    reaches the model (the same JSON parser and request model as the route's), so it needs no reservation. Raises
    APIError where the route would refuse it after parsing (not ready, unknown model, bad template, too long)."""
    from pydantic import ValidationError

    from hearth.api.protocol import ChatCompletionRequest, CompletionRequest

    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    chat = path == "/v1/chat/completions"
    try:
        request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
    except ValidationError:
        return None
    state = scope["app"].state.hearth  # the routes' ServerState
    state.check_ready()
    state.check_model(request.model)
    if chat:
        from hearth.api.chat import render_prompt

        lengths = [len(render_prompt(state, request))]
    else:
        from hearth.api.completions import _prompts

        lengths = [len(ids) for ids, _ in _prompts(state, request)]
    for length in lengths:
        state.check_length(length, request.max_new_tokens, "messages" if chat else "prompt")
    most = state.engine.model_info.max_model_len - max(lengths)
    return TokenAsk(sum(lengths), len(lengths) * request.n, request.max_new_tokens, most), data


def with_max_tokens(scope: Scope, data: dict, field: str, value: int) -> bytes:
    """The body with `field` set to `value`; the scope's Content-Length follows it."""
    data[field] = value
    try:
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
        body = json.dumps(data, separators=(",", ":")).encode()
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
    scope["headers"] = headers + [(b"content-length", str(len(body)).encode())]
    return body


class GovernanceMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore | None = None, audit: AuditLog | None = None,
                 limiter: RateLimiter | None = None, require_key: bool = False,
                 served_model_name: str | None = None, ledger: Any = None,
                 max_body_bytes: int | None = None) -> None:  # fmt: skip
        self.app = app
        self.keys = keys
        self.audit = audit
        self.ledger = ledger  # accounting.usage.UsageLedger: tokens and busy time for `hearth usage`
        self.limiter = limiter or RateLimiter()
        self.require_key = require_key
        self.served_model_name = served_model_name
        # bodies read here for token limits stop at the app's limit (the BodyLimitMiddleware inside this one)
        self.max_body_bytes = max_body_bytes or getattr(app, "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES

    async def authorize(self, scope: Scope, path: str) -> tuple[Any, Any]:
        """(key record or None, refusal response or None)."""
        if self.keys is None:
            if self.require_key:
                return None, error_response("this server requires an API key, but no key store is configured", 401)
            return None, None
        locked, problem = self.keys.state()
        if not (self.require_key or locked):
            return None, None
        if problem is not None:
            return None, keys_unavailable()
        token = bearer_token(scope)
        headers = {"WWW-Authenticate": "Bearer"}
        if not token:
            message = MISSING_KEY if token is None else "malformed Authorization header: expected `Bearer <key>`"
            return None, error_response(message, 401, code="invalid_api_key", headers=headers)
        result = await anyio.to_thread.run_sync(self.keys.verify, token)  # scrypt, the first time: off the loop
        record = result.record
        if record is None:
            if result.status == 503:
                return None, keys_unavailable()
            return None, error_response(result.error or "invalid API key", 401, code="invalid_api_key",
                                        headers=headers)  # fmt: skip
        if path in ADMIN_PATHS and record.scope != "admin":
            return record, error_response(f"API key {record.id} has scope {record.scope!r}; {path} needs an admin key",
                                          403, code="insufficient_scope")  # fmt: skip
        return record, None

    async def admit(self, scope: Scope, receive: Receive, record: Any,
                    path: str) -> tuple[Any, Reservation | None, bytes | None]:  # fmt: skip
        """(refusal response or None, the reservation, the body to hand on or None to pass the request's own)."""
        if record.rpm is None and record.tpm is None:
            return None, None, None
        ask, data, body, field = None, None, None, GENERATING_PATHS.get(path)
        if record.tpm is not None and field is not None and scope.get("method") == "POST":
            try:
                body = await read_body(receive, self.max_body_bytes)
            except BodyTooLarge as e:
                return error_response(e.detail, 413), None, None
            try:
                planned = token_ask(scope, path, body)
            except APIError as e:  # what the route would answer
                return error_response(e.message, e.status, e.param, e.code, e.headers), None, None
            if planned is not None:
                ask, data = planned
        result = self.limiter.admit(record.id, record.rpm, record.tpm, ask)
        if isinstance(result, Refusal):
            return error_response(result.message, 429, code="rate_limit_exceeded",
                                  headers={"Retry-After": str(result.retry_after)}), None, None  # fmt: skip
        if result.granted_max_tokens is not None and field is not None and data is not None:
            try:
                body = with_max_tokens(scope, data, field, result.granted_max_tokens)
            except BaseException:
                self.limiter.settle(result, 0)  # never leave a reservation behind
                raise
        return None, result if record.tpm is not None else None, body

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
        reservation: Reservation | None = None
        try:
            app_receive = tracked_receive if transcripts else receive
            try:
                record, refusal = await self.authorize(scope, path)
                if record is not None:
                    state["key_id"] = record.id
                if refusal is None and record is not None:
                    refusal, reservation, body = await self.admit(scope, app_receive, record, path)
                    if body is not None:  # read here (the transcript has it as sent): hand it on
                        pending = [{"type": "http.request", "body": body, "more_body": False}]

                        async def replay() -> Message:
                            return pending.pop() if pending else await receive()

                        app_receive = replay
            except _ClientGone:
                status, transcripts = CLIENT_CLOSED, False
                return
            except Exception as e:  # a check that cannot finish refuses the request
                # where, not the message nor a traceback's text: either could quote the presented key
                where = traceback.extract_tb(e.__traceback__)[-1]
                logger.error("could not check the key or limits of a request to %s: %s at %s:%d", path,
                             type(e).__name__, where.filename, where.lineno)  # fmt: skip
                refusal = keys_unavailable() if record is None else error_response("internal server error", 500)
            if refusal is not None:
                transcripts = False  # nothing reached the model
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, app_receive, tracked_send)
        finally:
            with anyio.CancelScope(shield=True):  # the record is written even if the client went away
                usage = state.get("usage")
                if reservation is not None:
                    if usage is not None:
                        used = usage.prompt_tokens + usage.completion_tokens
                    else:  # gone before its response began: the model may have read the prompt
                        used = reservation.prompt_tokens if status == CLIENT_CLOSED or not started else 0
                    self.limiter.settle(reservation, used)
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
