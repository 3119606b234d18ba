"""POST /v1/completions: prompts (texts or token ids) → token ids → engine (prompts × n choices) → JSON or SSE chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hearth.api import sse
from hearth.api.errors import APIError
from hearth.api.fanout import (
    Fanout,
    SubRequest,
    UsageCounter,
    run_fanout,
    sampling_params,
    stream_with_cleanup,
    token_budget,
    until_disconnected,
)
from hearth.api.protocol import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from hearth.api.structured import check_structured, grammar_for
from hearth.engine.protocol import Delta

if TYPE_CHECKING:
    from hearth.api.state import ServerState

logger = logging.getLogger(__name__)


def _prompt_items(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts (texts or token id lists), checked for emptiness and count."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError("prompt must not be empty", 400, "prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    for i, item in enumerate(items):
        if not isinstance(item, str) and not item:
            raise APIError(f"prompt {i} is empty", 400, "prompt")
    if len(items) * body.n > MAX_CHOICES:
        raise APIError(f"{len(items)} prompts × n={body.n} is more than {MAX_CHOICES} choices per request", 400,
                       "prompt")  # fmt: skip
    return items


def _tokenize(tokenizer: Any, items: list[str | list[int]]) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt. Runs in a worker thread (see ServerState.off_loop)."""
    return [(tokenizer.encode(item, add_special_tokens=True), item) if isinstance(item, str) else (list(item), None)
            for item in items]  # fmt: skip


class CompletionLogprobBuilder:
    """The legacy completions `logprobs` object, built token by token; text_offset counts characters of the text."""

    def __init__(self, state: ServerState, offset: int) -> None:
        self.state = state
        self.offset = offset

    def build(self, delta: Delta) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in delta.logprobs or []:
            token = self.state.token_text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.state.token_text(t): v for t, v in lp.top})
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out


def _merge_logprobs(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state = await state.engine_for(body.model, body.keep_alive)
    if body.suffix:
        raise APIError("suffix is not supported", 400, "suffix")
    if body.echo and body.logprobs is not None:
        raise APIError("echo together with logprobs is not supported (prompt logprobs are not computed)", 400, "echo")
    structured = grammar_for(body, None, state.tokenizer)
    if structured.grammar is not None:
        await state.off_loop(check_structured, state.tokenizer, structured)
    prompts = await state.off_loop(_tokenize, state.tokenizer, _prompt_items(body))
    max_tokens = token_budget(state, request, [len(ids) for ids, _ in prompts], body.n, body.max_new_tokens, "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    subs = []
    for p, (ids, _) in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            params = sampling_params(body, body.logprobs, j, max_tokens)
            params.grammar = structured.grammar
            subs.append(SubRequest(index, f"{request_id}-{index}", ids, params))
    model = state.served_model_name

    async def respond(fanout: Fanout) -> Response:
        # token id prompts are decoded only now that the engine has accepted them (ids within the vocabulary)
        echoes = []
        for ids, text in prompts:
            echo = (text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""
            echoes += [echo] * body.n
        counter = UsageCounter(subs, body.n, request)
        builders = [CompletionLogprobBuilder(state, len(echo)) for echo in echoes]
        if body.stream:
            return StreamingResponse(stream_with_cleanup(fanout, _stream(fanout, counter, builders, echoes)),
                                     media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)  # fmt: skip
        texts = list(echoes)
        logprobs = [CompletionLogprobs() if body.logprobs is not None else None for _ in subs]
        finish: list[str | None] = [None] * len(subs)

        async def collect() -> None:
            async for item in fanout.deltas():
                assert item is not None
                i, delta = item
                counter.add(i, delta)
                texts[i] += delta.text
                if logprobs[i] is not None:
                    _merge_logprobs(logprobs[i], builders[i].build(delta))
                if delta.finished:
                    finish[i] = delta.finish_reason

        await until_disconnected(request, collect(), fanout.abort)
        counter.record(state.metrics)
        choices = [CompletionChoice(index=i, text=texts[i], logprobs=logprobs[i], finish_reason=finish[i])
                   for i in range(len(subs))]  # fmt: skip
        usage = counter.usage()
        logger.info("%s: %d prompt tokens, %d completion tokens", request_id, usage.prompt_tokens,
                    usage.completion_tokens)  # fmt: skip
        response = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    async def _stream(fanout: Fanout, counter: UsageCounter, builders: list, echoes: list[str]) -> AsyncIterator[bytes]:
        exclude = None if body.include_usage else {"usage"}
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
            resp = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return sse.event(resp, exclude)

        if body.echo:
            for i, echo in enumerate(echoes):
                yield chunk([CompletionChoice(index=i, text=echo)])
        async for item in fanout.deltas(keep_alive=sse.KEEP_ALIVE_SECONDS):
            if item is None:
                yield sse.KEEP_ALIVE
                continue
            i, delta = item
            counter.add(i, delta)
            lp = builders[i].build(delta) if body.logprobs is not None else None
            if delta.text or delta.logprobs:
                yield chunk([CompletionChoice(index=i, text=delta.text, logprobs=lp)])
            if delta.finished:
                yield chunk([CompletionChoice(index=i, text="", finish_reason=delta.finish_reason)])
        counter.record(state.metrics)
        if body.include_usage:
            yield chunk([], counter.usage())
        yield sse.DONE

    return await run_fanout(state, request, subs, respond)
