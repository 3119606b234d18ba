"""The refusals governance answers with itself, in the error shape of the route refused.

The middleware sits in front of the API app and answers some requests before any route sees them (a missing or bad
key, a scope that does not reach an admin path, a full per-minute limit, a key store that cannot be read). Those answers
carry the body every other error of the same route carries, built here so that governance depends on Starlette alone
and not on the API package above it (which builds its own errors with `error_body` too): OpenAI's
{"error": {"message", "type", "param", "code"}} everywhere but under ANTHROPIC_PREFIX, where the routes speak
Anthropic's Messages API and errors are {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


ANTHROPIC_PREFIX = "/v1/messages"  # /v1/messages and /v1/messages/count_tokens
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def anthropic_route(path: str | None) -> bool:
    """Whether errors on `path` take Anthropic's shape."""
    return path is not None and (path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"))


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               path: str | None = None, types: dict[int, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The error body for a request to `path`: Anthropic's shape on its routes (no param or code there), else
    OpenAI's with the error type from `types` (default: ERROR_TYPES)."""
    if anthropic_route(path):
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = (types or ERROR_TYPES).get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message may quote what the client sent (a key id, a path)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int, code: str | None = None, headers: dict[str, str] | None = None,
                   path: str | None = None) -> JSONResponse:  # fmt: skip
    """An ASGI response refusing a request to `path` with `status` and that route's error body."""
    return _ASCIIJSONResponse(error_body(message, status, code=code, path=path), status_code=status, headers=headers)
