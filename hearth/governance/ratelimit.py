"""Per-key limits over a sliding 60-second window: requests per minute, and tokens (prompt + completion) per minute.

Requests are counted when the middleware admits them (`RateLimiter.admit`). Tokens are reserved by the route that
runs the model, once it has tokenized the prompt and checked its length and before it submits anything to the engine
(`RateLimiter.reserve`, called through the hook the middleware leaves in the request's state), and settled when the
request ends. The route states its TokenAsk: its prompt tokens, how many completions it makes (prompts × n) and its
max_tokens. The reservation is prompt + completions × max_tokens. A request without max_tokens is granted what the key
has left (at most what fits the context), and it runs with that grant as its max_tokens. A reservation is made only
when the tokens charged in the last 60 s, plus those reserved by the key's requests in flight, plus its own stay within
`tpm`; otherwise the request gets 429 with Retry-After. A request that could never fit (its prompt and max_tokens
alone pass `tpm`) gets 429 too, as OpenAI answers, with a message that says so.

When a request ends, its reservation is replaced by what it used, charged at its end time; the unused rest is free at
once (a request that failed before generating used nothing). So the tokens of the requests that end in any 60 s window
never add up to more than `tpm`: a request generates only after its reservation, and when the last of them reserved,
each of the others had either reserved (at least what it used) and not yet settled, or had ended less than 60 s before
(it was charged).

Requests that generate nothing (GET /v1/models, a body the route refuses) reserve nothing and are limited by `rpm`
alone. State is per process: two servers on one $HEARTH_HOME each apply the limits on their own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0
IN_FLIGHT_RETRY_SECONDS = 1  # Retry-After when only the key's requests in flight stand in the way: they end any time


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)  # start times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (end time, tokens used)
    num_tokens: int = 0  # sum over `tokens`
    reserved: int = 0  # reservations of the requests in flight


@dataclass(slots=True)
class Refusal:
    message: str
    retry_after: int  # whole seconds, at least 1


@dataclass(slots=True)
class TokenAsk:
    """What a generating request may use: its prompt tokens and completions × max_tokens."""

    prompt_tokens: int  # each prompt counted once, as the usage counts it
    completions: int  # prompts × n
    max_tokens: int | None  # per completion; None: grant what the key has left
    most: int  # the most a completion can be granted when max_tokens is None (what fits the context)


class TokenLimitExceeded(Exception):
    """A request's tokens do not fit its key's token limit now (or ever); the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(slots=True)
class Reservation:
    """A request's hold on its key's token window, released by `RateLimiter.settle`."""

    key_id: str
    tokens: int  # reserved
    prompt_tokens: int
    max_tokens: int  # per completion: the request's own, or the grant when it had none
    settled: bool = False


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

    def admit(self, key_id: str, rpm: int | None) -> Refusal | None:
        """Count one request for `key_id`, or say why not and when to retry."""
        if rpm is None:
            return None
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key_id, _Window())
            self._prune(w, now)
            if len(w.requests) >= rpm:
                wait = w.requests[len(w.requests) - rpm] + WINDOW_SECONDS - now
                return Refusal(f"rate limit reached: key {key_id} allows {rpm} requests per minute; retry in "
                               f"{math.ceil(wait)} s", max(1, math.ceil(wait)))  # fmt: skip
            w.requests.append(now)
            return None

    def reserve(self, key_id: str, tpm: int, ask: TokenAsk) -> Reservation | Refusal:
        """Reserve a request's tokens in `key_id`'s window (granting max_tokens when it has none), or say why not."""
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key_id, _Window())
            self._prune(w, now)
            left = tpm - w.num_tokens - w.reserved
            grant = ask.max_tokens
            if grant is None:
                grant = max(1, min(ask.most, (left - ask.prompt_tokens) // max(1, ask.completions)))
            need = ask.prompt_tokens + ask.completions * grant
            asked = f"{ask.prompt_tokens} prompt tokens + {ask.completions} × {grant} completion tokens"
            if need > tpm:
                return Refusal(f"request too large: it needs {need} tokens ({asked}), but key {key_id} allows "
                               f"{tpm} tokens per minute; lower max_tokens or shorten the prompt",
                               int(WINDOW_SECONDS))  # fmt: skip
            if need > left:
                wait = self._wait(w, now, need - left)
                return Refusal(f"token rate limit reached: key {key_id} allows {tpm} tokens per minute and has "
                               f"{max(0, left)} left; this request needs {need} ({asked}); retry in {wait} s",
                               wait)  # fmt: skip
            w.reserved += need
            return Reservation(key_id, need, ask.prompt_tokens, grant)

    @staticmethod
    def _wait(w: _Window, now: float, missing: int) -> int:
        """Seconds until `missing` more tokens are free: when enough of the oldest charges leave the window."""
        for end, num in w.tokens:
            missing -= num
            if missing <= 0:
                return max(1, math.ceil(end + WINDOW_SECONDS - now))
        return IN_FLIGHT_RETRY_SECONDS

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replace a finished request's reservation with the tokens it used (charged now). Safe to call twice."""
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.tokens == 0 and used <= 0:
            return
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(reservation.key_id, _Window())
            self._prune(w, now)
            w.reserved -= reservation.tokens
            if used > 0:
                w.tokens.append((now, used))
                w.num_tokens += used
