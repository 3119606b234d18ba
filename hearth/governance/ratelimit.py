"""Per-key limits over a sliding 60-second window: requests per minute, and tokens (prompt + completion) per minute.

A request's tokens are known only when it ends, so the token limit admits a request while the window holds fewer
than `tpm` tokens and charges it afterwards (one request may overshoot; the next waits until the window has room).
State is per process: two servers on one $HEARTH_HOME each apply the limits on their own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)  # start times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (end time, tokens)
    num_tokens: int = 0  # sum over `tokens`


@dataclass(slots=True)
class Refusal:
    message: str
    retry_after: int  # whole seconds, at least 1


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def _prune(self, w: _Window, now: float) -> None:
        while w.requests and w.requests[0] <= now - WINDOW_SECONDS:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= now - WINDOW_SECONDS:
            w.num_tokens -= w.tokens.popleft()[1]

    def admit(self, key_id: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        """Count one request for `key_id`, or say why not and when to retry."""
        if rpm is None and tpm is None:
            return None
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key_id, _Window())
            self._prune(w, now)
            if rpm is not None and len(w.requests) >= rpm:
                wait = w.requests[len(w.requests) - rpm] + WINDOW_SECONDS - now
                return Refusal(f"rate limit reached: key {key_id} allows {rpm} requests per minute; retry in "
                               f"{math.ceil(wait)} s", max(1, math.ceil(wait)))  # fmt: skip
            if tpm is not None and w.num_tokens >= tpm:
                # wait until enough of the oldest charges leave the window to bring it under the limit
                over, wait = w.num_tokens - tpm, WINDOW_SECONDS
                for end, num in w.tokens:
                    over -= num
                    if over < 0:
                        wait = end + WINDOW_SECONDS - now
                        break
                return Refusal(f"token rate limit reached: key {key_id} allows {tpm} tokens per minute; retry in "
                               f"{math.ceil(wait)} s", max(1, math.ceil(wait)))  # fmt: skip
            if rpm is not None:
                w.requests.append(now)
            return None

    def charge(self, key_id: str, num_tokens: int) -> None:
        """Add a finished request's tokens to the key's window."""
        if num_tokens <= 0:
            return
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key_id, _Window())
            self._prune(w, now)
            w.tokens.append((now, num_tokens))
            w.num_tokens += num_tokens
