"""Errors in the shape of the route's API, with the right HTTP status: OpenAI's {"error": {"message", "type", "param",
"code"}}, or Anthropic's {"type": "error", "error": {"type", "message"}} on the Messages routes (/v1/messages...; the
choice by path is governance/errors.py's, shared with the key checks that answer before any route).

Validation errors (FastAPI's 422) become 400s naming the field, as OpenAI answers them. Bodies over the limit are
refused with 413 by an ASGI middleware that checks Content-Length and counts the bytes actually received. Requests
too malformed to reach the app (uvicorn's HTTP parser refuses them) get the same JSON shape from `http_protocol()`,
uvicorn's h11 protocol with its plain-text 400 replaced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.api.protocol import BODY_VALUE_ERROR
from hearth.engine.protocol import EngineError
from hearth.governance.errors import error_body as shaped_error_body

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_AFTER_SECONDS = 1

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
ERROR_CODES = {404: "not_found", 413: "request_too_large", 429: "queue_full", 503: "not_ready"}


class APIError(Exception):
    """An error the API answers with directly; raised by route code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               path: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The error body for a request to `path` (None: OpenAI's shape)."""
    return shaped_error_body(message, status, param, code or ERROR_CODES.get(status), path, ERROR_TYPES)


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote request text, and JSON's \\u escapes can carry any
    string (a lone surrogate included), where UTF-8 cannot."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int = 400, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str | None = None) -> JSONResponse:  # fmt: skip
    headers = dict(headers or {})
    if status == 429:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return ErrorJSONResponse(error_body(message, status, param, code, path), status_code=status, headers=headers)


def from_engine_error(e: EngineError) -> APIError:
    return APIError(str(e), e.status, e.param)


# --- validation -----------------------------------------------------------------------------------------------------


def field_path(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _common_prefix(locs: list[tuple]) -> tuple:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def describe_validation_error(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for the first invalid field; a union's alternatives are folded into their field."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == BODY_VALUE_ERROR:  # protocol.py's checks: the message and the field are in the error
        return str(first.get("msg")), (first.get("ctx") or {}).get("param")
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return f"malformed JSON in the request body: {reason}", None
    if loc in ((), ("body",)):
        if first.get("type") == "missing":
            return "the request body is missing: expected a JSON object", None
        return "the request body must be a JSON object", None
    # errors for one field's union alternatives share the field's path and add the alternative's type name
    same_field = [tuple(e.get("loc", ())) for e in errors if tuple(e.get("loc", ()))[:2] == loc[:2]]
    prefix = _common_prefix(same_field) if len(same_field) > 1 else loc
    param = field_path(prefix)
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return f"missing required field: {param}", param
    return f"invalid value for {param}: {msg}", param


# --- handlers -------------------------------------------------------------------------------------------------------


async def _handle_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_error(exc.errors())
    return error_response(message, 400, param, path=request.url.path)


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.message, exc.status, exc.param, exc.code, exc.headers, request.url.path)


async def _handle_engine_error(request: Request, exc: EngineError) -> JSONResponse:
    return error_response(str(exc), exc.status, exc.param, path=request.url.path)


async def _handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such route: {request.method} {request.url.path}"
    return error_response(message, exc.status_code, headers=getattr(exc, "headers", None), path=request.url.path)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                 exc_info=exc)  # fmt: skip
    return error_response("internal server error", 500, path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(EngineError, _handle_engine_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)


# --- body limit -----------------------------------------------------------------------------------------------------


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body passes the limit. An HTTPException, so FastAPI's body parsing re-raises it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse request bodies over `max_body_bytes` with 413: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        path = scope.get("path")
        lengths = {value for name, value in scope.get("headers") or [] if name.lower() == b"content-length"}
        if lengths:
            # RFC 9110: one or more ASCII digits (int() would also take signs, spaces, underscores and other scripts'
            # digits); repeated headers must agree
            length = lengths.pop()
            if lengths or not (length.isdigit() and length.isascii()):
                await error_response("invalid Content-Length header: expected one non-negative integer", 400,
                                     code="invalid_content_length", path=path)(scope, receive, send)  # fmt: skip
                return
            declared = int(length)
            if declared > limit:
                await error_response(BodyTooLarge(limit).detail, 413, path=path)(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as e:  # raised where no handler turned it into a response
            if started:
                raise
            await error_response(e.detail, 413, path=path)(scope, receive, send)


# --- requests uvicorn refuses before the app -----------------------------------------------------------------------


def http_protocol() -> type:
    """uvicorn's h11 protocol, answering requests it cannot parse (a malformed Content-Length, request line or header)
    with the OpenAI error shape instead of plain text. Pass it as `uvicorn.Config(http=...)`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSONErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            message = "invalid HTTP request: the request line or a header (Content-Length, say) is malformed"
            body = json.dumps(error_body(message, 400), ensure_ascii=True).encode("ascii")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # fmt: skip
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):  # fmt: skip
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JSONErrorH11Protocol
