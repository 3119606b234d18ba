"""The fan-out both generating endpoints share: one API request becomes (prompts × n) engine sub-requests whose Deltas
are merged into one stream, aborted together when the client goes away; the request's token budget (context length and
the key's token reservation) and its usage counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hearth.api import sse
from hearth.api.errors import APIError, error_body, from_engine_error
from hearth.api.protocol import PromptTokensDetails, SamplingFields, Usage
from hearth.engine.protocol import Delta, EngineClient, EngineError
from hearth.governance.ratelimit import TokenAsk, TokenLimitExceeded
from hearth.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hearth.api.state import ServerState

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"


class ClientDisconnected(Exception):
    pass


@dataclass(slots=True)
class SubRequest:
    index: int  # the choice index in the response
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def sampling_params(body: SamplingFields, logprobs: int | None, choice: int, max_tokens: int | None) -> SamplingParams:
    """The engine's parameters for one choice; with a seed, choice i samples with seed + i so choices differ.
    `max_tokens`: what `token_budget` returned (the request's own, or the grant of its key's token limit)."""
    seed = None if body.seed is None else body.seed + choice
    try:
        return SamplingParams(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            max_tokens=max_tokens, stop=body.stop_list, seed=seed, logprobs=logprobs,
            ignore_eos=body.ignore_eos, repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        )  # fmt: skip
    except (ValueError, OverflowError) as e:  # the message starts with the field's name
        name = str(e).split(" ", 1)[0]
        raise APIError(str(e), 400, name if name in SamplingFields.model_fields else None) from e


def token_budget(state: ServerState, request: Request, prompt_lengths: list[int], n: int, max_tokens: int | None,
                 param: str) -> int | None:  # fmt: skip
    """The max_tokens the request runs with, called once the prompts are tokenized and before anything is submitted to
    the engine. First every prompt must fit the context (`ServerState.check_length`: 400 naming `param` otherwise).
    Then, where the request's API key has a token limit, the governance middleware left a hook in the request's state
    that reserves the request's tokens (each prompt once, prompts × n completions of max_tokens) and grants a max_tokens
    when the request has none, at most what fits the context after the longest prompt; a refusal is 429 with
    Retry-After."""
    room = state.check_length(prompt_lengths, max_tokens, param)
    reserve = request.scope.get("state", {}).get("reserve_tokens")
    if reserve is None:
        return max_tokens
    ask = TokenAsk(sum(prompt_lengths), len(prompt_lengths) * n, max_tokens, room)
    try:
        return reserve(ask)
    except TokenLimitExceeded as e:
        raise APIError(e.message, 429, code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) from e


class Fanout:
    """The engine requests behind one API request, merged into one stream of (choice index, Delta).

    `prime()` waits for every request's first Delta, so refusals (context too long, queue full) become HTTP errors
    before a stream starts. `abort()` cancels and aborts whatever has not finished; it is safe to call twice.
    """

    def __init__(self, state: ServerState, subs: list[SubRequest]) -> None:
        self.engine: EngineClient = state.engine
        self.metrics = state.metrics
        self.subs = subs
        self.queue: asyncio.Queue[tuple[int, Delta | BaseException]] = asyncio.Queue()
        self.unfinished = {s.index for s in subs}
        self.buffer: list[tuple[int, Delta]] = []
        self.start = time.perf_counter()
        self.last_token_time: dict[int, float] = {}
        self.tasks = [asyncio.create_task(self._pump(s)) for s in subs]

    async def _pump(self, sub: SubRequest) -> None:
        try:
            async for delta in self.engine.generate(sub.prompt_ids, sub.params, sub.request_id):
                self.queue.put_nowait((sub.index, delta))
                if delta.finished:
                    return
            self.queue.put_nowait((sub.index, Delta(sub.request_id, [], "", finished=True, finish_reason="abort")))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which turns it into an error response
            self.queue.put_nowait((sub.index, e))

    def _observe(self, index: int, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.perf_counter()
        last = self.last_token_time.get(index)
        if last is None:
            self.metrics.time_to_first_token.observe(now - self.start)
        else:
            self.metrics.time_per_output_token.observe((now - last) / len(delta.token_ids))
        self.last_token_time[index] = now

    async def _next(self, timeout: float | None = None) -> tuple[int, Delta]:
        """The next Delta; raises asyncio.TimeoutError after `timeout` seconds without one (nothing is lost)."""
        index, item = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        if isinstance(item, BaseException):
            await self.abort()
            if isinstance(item, EngineError):
                raise from_engine_error(item)
            raise item
        self._observe(index, item)
        if item.finished:
            self.unfinished.discard(index)
        return index, item

    async def prime(self) -> None:
        waiting = {s.index for s in self.subs}
        while waiting:
            index, delta = await self._next()
            self.buffer.append((index, delta))
            waiting.discard(index)

    async def deltas(self, keep_alive: float | None = None) -> AsyncIterator[tuple[int, Delta] | None]:
        """Every Delta until all requests finish; None after `keep_alive` seconds without one."""
        while self.buffer:
            yield self.buffer.pop(0)
        while self.unfinished:
            try:
                item = await self._next(keep_alive)
            except asyncio.TimeoutError:  # noqa: UP041 (not the builtin before Python 3.11)
                yield None
                continue
            yield item

    async def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        for sub in self.subs:
            if sub.index in self.unfinished:
                await self.engine.abort(sub.request_id)
        self.unfinished.clear()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T], on_disconnect: Callable[[], Awaitable[None]]) -> T:
    """Await `work`, unless the client goes away first: then cancel it, call `on_disconnect` and raise."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await on_disconnect()
    if not work_task.cancelled() and work_task.done():
        return work_task.result()
    raise ClientDisconnected()


async def run_fanout(state: ServerState, request: Request, subs: list[SubRequest],
                     respond: Callable[[Fanout], Awaitable[Response]]) -> Response:  # fmt: skip
    """Start the engine requests, wait for each one's first Delta (or a refusal), then build the response."""
    request.state.model = state.served_model_name  # for the audit log and the usage ledger
    fanout = Fanout(state, subs)
    try:
        await until_disconnected(request, fanout.prime(), fanout.abort)
        return await respond(fanout)
    except ClientDisconnected:
        logger.info("%s: client disconnected; aborted", subs[0].request_id.rsplit("-", 1)[0])
        return JSONResponse(error_body("client disconnected", CLIENT_CLOSED), status_code=CLIENT_CLOSED)
    except BaseException:
        await fanout.abort()
        raise


def openai_error_events(e: APIError) -> list[bytes]:
    return [sse.event(error_body(e.message, e.status, e.param, e.code)), sse.DONE]


async def stream_with_cleanup(fanout: Fanout, chunks: AsyncIterator[bytes],
                              error_events: Callable[[APIError], list[bytes]] = openai_error_events,
                              ) -> AsyncIterator[bytes]:  # fmt: skip
    """SSE body: the chunks, in-stream error events if the engine fails (`error_events`: the endpoint's shape), and
    abort on disconnect (cancellation)."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        for event in error_events(e):
            yield event
    finally:
        with anyio.CancelScope(shield=True):  # starlette cancels the body task when the client disconnects
            await fanout.abort()


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))  # fmt: skip


class UsageCounter:
    """Token counts over a request's choices: each prompt counted once (as OpenAI does for n > 1).

    With `request`, it is left in the request's state (`request.state.usage`), where the audit log reads the counts
    and finish reasons once the response is done.
    """

    def __init__(self, subs: list[SubRequest], n: int, request: Request | None = None) -> None:
        self.n = n
        self.request_id = subs[0].request_id.rsplit("-", 1)[0] if subs else None
        self.prompt_tokens = sum(len(s.prompt_ids) for s in subs if s.index % n == 0)
        self.completion_tokens = 0
        self.reasoning_tokens = 0  # set by chat completions for reasoning models
        self.cached: dict[int, int] = {}
        self.finish_reasons: dict[int, str | None] = {}
        if request is not None:
            request.state.usage = self

    def add(self, index: int, delta: Delta) -> None:
        self.completion_tokens += len(delta.token_ids)
        if index % self.n == 0 and delta.num_cached_tokens:
            self.cached[index] = delta.num_cached_tokens
        if delta.finished:
            self.finish_reasons[index] = delta.finish_reason

    def usage(self) -> Usage:
        return make_usage(self.prompt_tokens, self.completion_tokens, sum(self.cached.values()))

    def record(self, metrics: Any) -> None:
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.generation_tokens.inc(self.completion_tokens)
