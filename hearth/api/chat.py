"""POST /v1/chat/completions: messages → chat template → token ids → engine (n choices) → JSON or SSE chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hearth.api import sse
from hearth.api.completions import (
    Fanout,
    SubRequest,
    UsageCounter,
    run_fanout,
    sampling_params,
    stream_with_cleanup,
    until_disconnected,
)
from hearth.api.errors import APIError
from hearth.api.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatMessage,
    ChatResponseMessage,
    TopLogprob,
    Usage,
)
from hearth.engine.protocol import Delta

if TYPE_CHECKING:
    from hearth.api.app import ServerState

logger = logging.getLogger(__name__)


def message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as templates expect it: content as one string (text parts joined by newlines)."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"content parts of type {kind!r} are not supported; only text parts are", 400,
                               f"messages[{index}].content[{j}]")  # fmt: skip
            texts.append(part["text"])
        out["content"] = "\n".join(texts)
    elif content is None:
        out["content"] = ""
    return out


def render_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    from hearth.chat.template import TemplateError

    messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs["reasoning_effort"] = body.reasoning_effort
    try:
        prompt = state.chat_template.render(messages, add_generation_prompt=True, tools=tools, **kwargs)
    except TemplateError as e:
        raise APIError(str(e), 400, "messages") from e
    return state.tokenizer.encode(prompt, add_special_tokens=False)


def chat_logprobs(state: ServerState, delta: Delta) -> list[ChatLogprob]:
    out = []
    for lp in delta.logprobs or []:
        token = state.token_text(lp.token_id)
        top = [TopLogprob(token=state.token_text(t), logprob=v, bytes=list(state.token_text(t).encode()))
               for t, v in lp.top]  # fmt: skip
        out.append(ChatLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top))
    return out


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_ready()
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", 400, "top_logprobs")
    prompt_ids = render_prompt(state, body)
    state.check_length(len(prompt_ids), body.max_new_tokens, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    n = body.n
    subs = [SubRequest(i, f"{request_id}-{i}", prompt_ids, sampling_params(body, body.num_logprobs, i))
            for i in range(n)]  # fmt: skip
    model = state.served_model_name
    want_logprobs = body.logprobs

    async def respond(fanout: Fanout) -> Response:
        counter = UsageCounter(subs, n)
        if body.stream:
            return StreamingResponse(stream_with_cleanup(fanout, _stream(fanout, counter)), media_type=sse.MEDIA_TYPE,
                                     headers=sse.HEADERS)  # fmt: skip
        texts = [""] * n
        logprobs: list[list[ChatLogprob]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n

        async def collect() -> None:
            async for item in fanout.deltas():
                assert item is not None
                i, delta = item
                counter.add(i, delta)
                texts[i] += delta.text
                if want_logprobs:
                    logprobs[i] += chat_logprobs(state, delta)
                if delta.finished:
                    finish[i] = delta.finish_reason

        await until_disconnected(request, collect(), fanout.abort)
        counter.record(state.metrics)
        choices = [
            ChatChoice(index=i, message=ChatResponseMessage(content=texts[i]), finish_reason=finish[i],
                       logprobs=ChatChoiceLogprobs(content=logprobs[i]) if want_logprobs else None)
            for i in range(n)
        ]  # fmt: skip
        usage = counter.usage()
        logger.info("%s: %d prompt tokens, %d completion tokens", request_id, usage.prompt_tokens,
                    usage.completion_tokens)  # fmt: skip
        response = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    async def _stream(fanout: Fanout, counter: UsageCounter) -> AsyncIterator[bytes]:
        exclude = None if body.include_usage else {"usage"}
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
            resp = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return sse.event(resp, exclude)

        for i in range(n):  # the first chunk of each choice carries the role, as OpenAI's do
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async for item in fanout.deltas(keep_alive=sse.KEEP_ALIVE_SECONDS):
            if item is None:
                yield sse.KEEP_ALIVE
                continue
            i, delta = item
            counter.add(i, delta)
            lp = ChatChoiceLogprobs(content=chat_logprobs(state, delta)) if want_logprobs and delta.logprobs else None
            if delta.text or lp is not None:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=delta.text), logprobs=lp)])
            if delta.finished:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=delta.finish_reason)])
        counter.record(state.metrics)
        if body.include_usage:
            yield chunk([], counter.usage())
        yield sse.DONE

    return await run_fanout(state, request, subs, respond)
