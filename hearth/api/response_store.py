"""The responses store: `POST /v1/responses` with `store` true keeps the response, and the conversation that led to it,
in SQLite at `$HEARTH_HOME/responses.db`, so `previous_response_id`, `GET /v1/responses/{id}`, its input items and
`DELETE` can find it later (docs/responses-store.md).

The rows hold prompt and completion text, kept because the client asked (`store` is true unless it says otherwise);
`hearth serve --no-store` keeps nothing. Each row belongs to the API key that made it (its id; "" when the server runs
without keys): lookups match on the owner, so another key's response reads exactly like an unknown id. The file is
created mode 0600 in a 0700 folder, and deleted rows are overwritten (`secure_delete`), not merely unlinked. Nothing
here logs text. Thread-safe: one connection behind a lock; the server calls it from worker threads.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from hearth.config import hearth_home

FILE_MODE = 0o600
SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, response TEXT NOT NULL,
    conversation TEXT NOT NULL, num_input INTEGER NOT NULL)"""


def default_store_path() -> str:
    return os.path.join(hearth_home(), "responses.db")


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as the API returned it
    conversation: list[dict[str, Any]]  # every input item the model read (earlier turns first), instructions aside
    num_input: int  # how many of the last conversation items were this request's own input

    @property
    def input_items(self) -> list[dict[str, Any]]:
        return self.conversation[len(self.conversation) - self.num_input :]

    @property
    def continuation(self) -> list[dict[str, Any]]:
        """What `previous_response_id` puts before a new request's input: the conversation and this response's output."""
        return self.conversation + list(self.response.get("output") or [])


class ResponseStore:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_store_path()
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # create the file with its mode before SQLite opens it (SQLite gives its journal the database file's mode)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.execute(SCHEMA)

    def put(self, owner: str, response: dict[str, Any], conversation: list[dict[str, Any]], num_input: int) -> None:
        row = (response["id"], owner, time.time(), json.dumps(response, ensure_ascii=False),
               json.dumps(conversation, ensure_ascii=False), num_input)  # fmt: skip
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if it exists and belongs to `owner`; None otherwise (the two are not told apart)."""
        with self._lock:
            row = self._conn.execute("SELECT response, conversation, num_input FROM responses WHERE id = ? AND owner = ?",
                                     (response_id, owner)).fetchone()  # fmt: skip
        if row is None:
            return None
        return StoredResponse(json.loads(row[0]), json.loads(row[1]), int(row[2]))

    def delete(self, response_id: str, owner: str) -> bool:
        """Remove `owner`'s response; False when there is none (or it is another owner's)."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
            return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()
