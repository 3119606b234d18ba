"""POST /v1/chat/completions: messages → chat template → token ids → engine (n choices) → JSON or SSE chunks."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
    NamedToolChoice,
    TopLogprob,
    Usage,
)
from hearth.api.structured import check_structured, grammar_for
from hearth.engine.protocol import Delta

if TYPE_CHECKING:
    from hearth.api.state import ServerState

logger = logging.getLogger(__name__)

# an effort named by the Responses or Messages API as the chat path's reasoning_effort: the same names, and anything
# above high is high
REASONING_EFFORT = {"none": "none", "minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
                    "xhigh": "high", "max": "high"}  # fmt: skip


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


def check_tool_choice(body: ChatCompletionRequest) -> None:
    """400 when tool_choice asks for a tool the request does not offer: "required" or a named function with no tools,
    or a name that is not among them ("auto" and "none" need no tools)."""
    choice = body.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    names = [t.function.name for t in body.tools or []]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(f"tool_choice names a function {choice.function.name!r} that is not in tools", 400,
                           "tool_choice")  # fmt: skip
    elif not names:
        raise APIError(f"tool_choice {choice!r} needs tools, but the request has none", 400, "tool_choice")


def request_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools offered to the model: none with tool_choice "none"; only the named one for a named choice."""
    if not body.tools or body.tool_choice == "none":
        return None
    choice = body.tool_choice
    tools = body.tools
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    return [t.model_dump(exclude_none=True) for t in tools]


async def render_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The prompt's token ids. Rendering and tokenizing run in the server's worker threads, never on the event loop:
    a long prompt or a slow template must not stall other requests (the template stops itself at its time limit)."""
    from hearth.chat.template import TemplateError

    messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
    tools = request_tools(body)
    kwargs = dict(body.chat_template_kwargs or {})

    def render() -> list[int]:
        return state.chat_format.render(state.tokenizer, messages, tools, body.reasoning_effort, **kwargs)

    try:
        return await state.off_loop(render)
    except TemplateError as e:
        raise APIError(str(e), 400, "messages") from e


def tool_call_dicts(calls: list, start: int = 0, streaming: bool = False) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    out = []
    for k, call in enumerate(calls):
        item = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        out.append({"index": start + k, **item} if streaming else item)
    return out


class ChoiceParser:
    """One choice's output parser (reasoning / tool calls), or a pass-through; counts reasoning tokens.

    A reasoning token is a generated token id whose delta the parser read inside the reasoning: from the opening markup
    (`<think>`, an analysis header) through the closing one (`</think>`, `<|end|>`). Tokens of markup that does not yet
    say where it goes wait in `pending` until the parser decides.
    """

    def __init__(self, state: ServerState, with_tools: bool, tool_parser: str | None = None):
        """`tool_parser`: parse tool calls with this one (a forced call's syntax) where the chat format has none."""
        fmt = state.chat_format
        if tool_parser is not None and fmt.tool_parser is None and not fmt.harmony:
            fmt = dataclasses.replace(fmt, tool_parser=tool_parser)
        self.parser = fmt.parser(with_tools)
        self.num_tool_calls = 0
        self.num_reasoning_tokens = 0
        self.pending = 0

    def feed(self, delta: Delta):
        from hearth.chat.reasoning import REASONING, UNDECIDED, ParsedDelta

        if self.parser is None:
            return ParsedDelta(content=delta.text)
        before = self.parser.phase
        parsed = self.parser.feed(delta.text)
        if delta.finished:
            parsed.extend(self.parser.finish())
        after = self.parser.phase
        if REASONING in (before, after) or parsed.reasoning:
            self.num_reasoning_tokens += self.pending + len(delta.token_ids)
            self.pending = 0
        elif after == UNDECIDED:
            self.pending += len(delta.token_ids)
        else:
            self.pending = 0
        return parsed

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.num_tool_calls and reason == "stop" else reason


def chat_logprobs(state: ServerState, delta: Delta) -> list[ChatLogprob]:
    out = []
    for lp in delta.logprobs or []:
        token = state.token_text(lp.token_id)
        top = [TopLogprob(token=state.token_text(t), logprob=v, bytes=list(state.token_text(t).encode()))
               for t, v in lp.top]  # fmt: skip
        out.append(ChatLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top))
    return out


async def chat_subrequests(state: ServerState, body: ChatCompletionRequest, request: Request, request_id: str,
                           param: str = "messages") -> tuple[list[SubRequest], str | None]:  # fmt: skip
    """The engine requests of a chat-shaped request (chat completions, and the endpoints translated into one): check
    tool_choice, render the prompt, take the token budget (the one length check and the key's reservation; `param`
    names the field a too-long prompt came from) and build the n sub-requests with the chat format's stop tokens and
    the grammar of `response_format` / strict or forced tools (api/structured.py). Also returns the tool-call parser a
    forced call's syntax needs where the chat format has none (ChoiceParser's `tool_parser`)."""
    check_tool_choice(body)
    structured = grammar_for(body, state.chat_format, state.tokenizer)
    if structured.grammar is not None:
        await state.off_loop(check_structured, state.tokenizer, structured)
    prompt_ids = await render_prompt(state, body)
    max_tokens = token_budget(state, request, [len(prompt_ids)], body.n, body.max_new_tokens, param)
    fmt = state.chat_format
    subs = [SubRequest(i, f"{request_id}-{i}", prompt_ids, sampling_params(body, body.num_logprobs, i, max_tokens))
            for i in range(body.n)]  # fmt: skip
    for sub in subs:
        sub.params.stop_token_ids = sub.params.stop_token_ids + fmt.stop_token_ids
        sub.params.skip_special_tokens = fmt.skip_special_tokens
        sub.params.grammar = structured.grammar
    return subs, structured.tool_parser


@dataclass
class PreparedChat:
    """A chat request made ready to run: its engine sub-requests (one per choice) and their output parsers. What
    /v1/chat/completions and the endpoints translated onto it (/v1/messages) share up to the engine."""

    state: ServerState  # the model's own (ServerState.engine_for)
    request_id: str
    subs: list[SubRequest]
    parsers: list[ChoiceParser]

    def usage(self, counter: UsageCounter) -> Usage:
        """The counter's usage, with the reasoning tokens the parsers counted (for reasoning models)."""
        usage = counter.usage()
        if self.state.chat_format.has_reasoning:
            counter.reasoning_tokens = sum(p.num_reasoning_tokens for p in self.parsers)
            usage.completion_tokens_details.reasoning_tokens = counter.reasoning_tokens
        return usage


async def prepare_chat(state: ServerState, body: ChatCompletionRequest, request: Request,
                       id_prefix: str = "chatcmpl-") -> PreparedChat:  # fmt: skip
    """Validate, render and tokenize the chat, check its length and reserve its tokens (fanout.token_budget), and build
    the sub-requests; nothing reaches the engine yet."""
    state = await state.engine_for(body.model, body.keep_alive)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", 400, "top_logprobs")
    n = body.n
    request_id = f"{id_prefix}{uuid.uuid4().hex}"
    subs, tool_parser = await chat_subrequests(state, body, request, request_id)
    with_tools = request_tools(body) is not None
    return PreparedChat(state, request_id, subs, [ChoiceParser(state, with_tools, tool_parser) for _ in range(n)])


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    prepared = await prepare_chat(state, body, request)
    state = prepared.state
    n = body.n
    request_id, subs, parsers = prepared.request_id, prepared.subs, prepared.parsers
    fmt = state.chat_format
    model = state.served_model_name
    want_logprobs = body.logprobs
    usage_with_reasoning = prepared.usage

    async def respond(fanout: Fanout) -> Response:
        counter = UsageCounter(subs, n, request)
        if body.stream:
            return StreamingResponse(stream_with_cleanup(fanout, _stream(fanout, counter)), media_type=sse.MEDIA_TYPE,
                                     headers=sse.HEADERS)  # fmt: skip
        from hearth.chat.reasoning import ParsedDelta

        parsed = [ParsedDelta() for _ in range(n)]
        logprobs: list[list[ChatLogprob]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n

        async def collect() -> None:
            async for item in fanout.deltas():
                assert item is not None
                i, delta = item
                counter.add(i, delta)
                parsed[i].extend(parsers[i].feed(delta))
                if want_logprobs:
                    logprobs[i] += chat_logprobs(state, delta)
                if delta.finished:
                    parsers[i].num_tool_calls = len(parsed[i].tool_calls)
                    finish[i] = parsers[i].finish_reason(delta.finish_reason)

        await until_disconnected(request, collect(), fanout.abort)
        counter.record(state.metrics)
        choices = [
            ChatChoice(index=i, finish_reason=finish[i],
                       message=ChatResponseMessage(content=p.content if p.content or not p.tool_calls else None,
                                                   reasoning_content=p.reasoning if fmt.has_reasoning else None,
                                                   tool_calls=tool_call_dicts(p.tool_calls)),
                       logprobs=ChatChoiceLogprobs(content=logprobs[i]) if want_logprobs else None)
            for i, p in enumerate(parsed)
        ]  # fmt: skip
        usage = usage_with_reasoning(counter)
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
            p = parsers[i].feed(delta)
            if p.reasoning or p.tool_calls:
                calls = tool_call_dicts(p.tool_calls, parsers[i].num_tool_calls, streaming=True)
                parsers[i].num_tool_calls += len(p.tool_calls)
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(reasoning_content=p.reasoning or None,
                                                                      tool_calls=calls))])  # fmt: skip
            if p.content or lp is not None:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=p.content), logprobs=lp)])
            if delta.finished:
                reason = parsers[i].finish_reason(delta.finish_reason)
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=reason)])
        counter.record(state.metrics)
        if body.include_usage:
            yield chunk([], usage_with_reasoning(counter))
        yield sse.DONE

    return await run_fanout(state, request, subs, respond)
