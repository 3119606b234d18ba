"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` per chunk, `data: [DONE]\\n\\n` at the end, and
comment lines as keep-alives (clients ignore lines starting with a colon).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"
KEEP_ALIVE_SECONDS = 15.0
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def named_event(data: dict[str, Any]) -> bytes:
    """One event named by its `type` (`event:` line, then `data:`), as the Anthropic and Responses streams send."""
    return f"event: {data['type']}\ndata: {dumps(data)}\n\n".encode()


def event(data: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    """One `data:` event; pydantic models are dumped with their OpenAI field rules."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", exclude=exclude)
    return f"data: {dumps(data)}\n\n".encode()
