"""The refusals governance answers with itself, in OpenAI's error shape.

The middleware sits in front of the API app and answers some requests before any route sees them (a missing or bad
key, a scope that does not reach an admin path, a full per-minute limit, a key store that cannot be read). Those answers
carry the body every other error of the server carries, {"error": {"message", "type", "param", "code"}}, built here
so that governance depends on Starlette alone and not on the API package above it.
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


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message may quote what the client sent (a key id, a path)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """An ASGI response refusing the request with `status` and OpenAI's error body."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": None,
                      "code": code}}  # fmt: skip
    return _ASCIIJSONResponse(body, status_code=status, headers=headers)
