"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, translated onto the chat path.

A Messages request becomes a ChatCompletionRequest (`to_chat_request`): `system` a system message, text blocks the
message's content, `tool_use` blocks an assistant message's `tool_calls`, `tool_result` blocks `tool` messages,
`thinking` blocks the assistant's `reasoning_content`; `tools` become functions (`input_schema` their parameters);
`tool_choice` any → "required", {type: tool, name} → the named function, none → "none"; `thinking` and
`output_config.effort` → reasoning_effort (and the templates' enable_thinking switch), `output_config.format` →
response_format json_schema. From there it runs exactly as a
chat completion does (api/chat.py's `prepare_chat`: rendering, the length check and token reservation, the reasoning
and tool-call parsers; api/fanout.py), and the parsed output is written as Anthropic's content blocks: `thinking`
(reasoning models, unless `thinking` is disabled or its display omitted), `text`, `tool_use`.

Stop reasons: a tool call → tool_use; the length limit → max_tokens; a stop string → stop_sequence (the engine says
only that it stopped, so the sequence is found again in the decoded output); otherwise end_turn. A thinking block's
`signature` is the SHA-256 of its text: Hearth verifies nothing that comes back, it only fills the field clients expect.
Errors on these routes take Anthropic's shape (api/errors.py chooses it by path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from hearth.api import sse
from hearth.api.chat import REASONING_EFFORT, PreparedChat, check_tool_choice, prepare_chat, render_prompt
from hearth.api.errors import APIError, describe_validation_error, error_body
from hearth.api.fanout import Fanout, UsageCounter, run_fanout, stream_with_cleanup, until_disconnected
from hearth.api.messages_protocol import (
    CountTokensRequest,
    MessagesRequest,
    ThinkingBlock,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from hearth.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
)
from hearth.governance.errors import ANTHROPIC_PREFIX

if TYPE_CHECKING:
    from hearth.api.state import ServerState

logger = logging.getLogger(__name__)

THINKING_EFFORT = ((4096, "low"), (16384, "medium"))  # budget_tokens below → reasoning_effort; above: "high"


# --- request: Messages → chat ---------------------------------------------------------------------------------------


def _effort(body: CountTokensRequest) -> str | None:
    """reasoning_effort: output_config.effort where given, else from the thinking budget (disabled: the least)."""
    thinking = body.thinking
    if body.output_config is not None and body.output_config.effort is not None:
        return REASONING_EFFORT[body.output_config.effort]
    if isinstance(thinking, ThinkingDisabled):
        return "low"
    if isinstance(thinking, ThinkingEnabled):
        return next((effort for limit, effort in THINKING_EFFORT if thinking.budget_tokens < limit), "high")
    return None


def shows_thinking(body: CountTokensRequest) -> bool:
    thinking = body.thinking
    return not (isinstance(thinking, ThinkingDisabled) or getattr(thinking, "display", None) == "omitted")


def to_chat_messages(body: CountTokensRequest) -> list[ChatMessage]:
    """The conversation as chat messages; 400 for what Anthropic's API refuses too: a tool_result that answers no
    tool_use of the assistant message right before it, a tool_use left unanswered by the next user message, blocks in
    the wrong role's message, and a final assistant message (continuing one, "prefill", is not supported). A
    tool_result marked is_error reaches the model as its text after "Error: "; redacted_thinking blocks are dropped."""
    out: list[ChatMessage] = []
    if body.system_text:
        out.append(ChatMessage(role="system", content=body.system_text))
    open_calls: dict[str, str] = {}  # tool_use id → name, from the assistant message right before
    for i, message in enumerate(body.messages):
        blocks = message.blocks
        if message.role == "assistant":
            if open_calls:
                raise APIError(f"messages[{i}]: the tool_use blocks {', '.join(open_calls)} of the previous assistant "
                               "message have no tool_result", 400, f"messages[{i}]")  # fmt: skip
            texts, thoughts, calls = [], [], []
            for j, block in enumerate(blocks):
                if isinstance(block, ToolResultBlock):
                    raise APIError("tool_result blocks belong in user messages", 400, f"messages[{i}].content[{j}]")
                if isinstance(block, ToolUseBlock):
                    open_calls[block.id] = block.name
                    calls.append({"id": block.id, "type": "function",
                                  "function": {"name": block.name, "arguments": json.dumps(block.input)}})  # fmt: skip
                elif isinstance(block, ThinkingBlock):
                    thoughts.append(block.thinking)
                elif block.type == "text":
                    texts.append(block.text)
            out.append(ChatMessage(role="assistant", content="".join(texts), tool_calls=calls or None,
                                   reasoning_content="\n".join(thoughts) or None))  # fmt: skip
            continue
        answered, texts = set(), []
        for j, block in enumerate(blocks):
            param = f"messages[{i}].content[{j}]"
            if isinstance(block, ToolResultBlock):
                if block.tool_use_id not in open_calls:
                    raise APIError(f"tool_result block refers to tool_use id {block.tool_use_id!r}, which is not a "
                                   "tool_use of the assistant message right before it", 400, param)  # fmt: skip
                if texts:  # text before a result: a user message of its own, in order
                    out.append(ChatMessage(role="user", content="".join(texts)))
                    texts = []
                answered.add(block.tool_use_id)
                text = f"Error: {block.text}" if block.is_error else block.text
                out.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                       name=open_calls[block.tool_use_id], content=text))  # fmt: skip
            elif block.type == "text":
                texts.append(block.text)
            elif block.type != "redacted_thinking":
                raise APIError(f"{block.type} blocks belong in assistant messages", 400, param)
        missing = [c for c in open_calls if c not in answered]
        if missing:
            raise APIError(f"messages[{i}]: the tool_use blocks {', '.join(missing)} of the previous assistant message "
                           "have no tool_result", 400, f"messages[{i}]")  # fmt: skip
        open_calls = {}
        if texts:
            out.append(ChatMessage(role="user", content="".join(texts)))
    if body.messages[-1].role == "assistant":
        raise APIError("the last message is the assistant's: continuing it (prefill) is not supported; end with a user "
                       "message", 400, f"messages[{len(body.messages) - 1}]")  # fmt: skip
    return out


def to_chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request a Messages request (or a count_tokens one, without max_tokens) runs as."""
    fields: dict[str, Any] = {"model": body.model, "messages": to_chat_messages(body), "n": 1}
    if body.tools:
        fields["tools"] = [Tool(function=FunctionDefinition(name=t.name, description=t.description,
                                                            parameters=t.input_schema)) for t in body.tools]  # fmt: skip
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceAny):
        fields["tool_choice"] = "required"
    elif isinstance(choice, ToolChoiceTool):
        fields["tool_choice"] = NamedToolChoice(function=NamedFunction(name=choice.name))
    elif isinstance(choice, ToolChoiceNone):
        fields["tool_choice"] = "none"
    elif choice is not None:
        fields["tool_choice"] = "auto"
    if choice is not None and choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    fields["reasoning_effort"] = _effort(body)
    if body.thinking is not None:
        fields["chat_template_kwargs"] = {"enable_thinking": not isinstance(body.thinking, ThinkingDisabled)}
    if body.output_config is not None and body.output_config.format is not None:
        schema = JsonSchemaFormat(name="output", schema=body.output_config.format.json_schema)
        fields["response_format"] = ResponseFormat(type="json_schema", json_schema=schema)
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                      stop=body.stop_sequences or None, stream=body.stream,
                      user=body.metadata.user_id if body.metadata else None)  # fmt: skip
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as e:  # checked above already; a 400, never a 500, if a rule differs
        message, param = describe_validation_error(e.errors())
        raise APIError(message, 400, param) from e


# --- response: parsed output → content blocks -----------------------------------------------------------------------


def signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()


def tool_input(arguments: str) -> dict[str, Any] | None:
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tool_use_block(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": arguments}


def matched_stop(text: str, stops: list[str]) -> str | None:
    """The stop sequence the engine stopped at: the first one to occur in the decoded output (the emitted text holds
    none, so the first occurrence is where generation stopped)."""
    found = [(i, -len(s), s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(found)[2] if found else None


def anthropic_usage(counter: UsageCounter, final: bool = True) -> dict[str, int]:
    """Anthropic counts input read from the cache apart from input_tokens."""
    usage = counter.usage()
    cached = usage.prompt_tokens_details.cached_tokens
    return {"input_tokens": usage.prompt_tokens - cached, "output_tokens": usage.completion_tokens if final else 0,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}  # fmt: skip


def anthropic_error_events(e: APIError) -> list[bytes]:
    return [sse.named_event(error_body(e.message, e.status, path=ANTHROPIC_PREFIX))]


class BlockWriter:
    """Turns one choice's ParsedDeltas into Anthropic content blocks, as stream events and as the final list.

    Thinking and text stream into the open block of their kind (a change of kind closes it); whitespace at the end of
    the text waits until more text follows, and is dropped when a tool call follows, so no chunking changes the
    blocks. A tool call is one whole tool_use block (the parsers emit calls complete); one whose arguments are not a
    JSON object is shown as text instead. With `single_tool`, calls after the first are dropped
    (disable_parallel_tool_use).
    """

    def __init__(self, show_thinking: bool, single_tool: bool) -> None:
        self.show_thinking, self.single_tool = show_thinking, single_tool
        self.blocks: list[dict[str, Any]] = []
        self.open: str | None = None  # kind of the last block while it is open
        self.held = ""  # whitespace-only text not yet written
        self.num_tools = 0

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.blocks.append(block)
        self.open = block["type"]
        empty = {**block, "input": {}} if block["type"] == "tool_use" else {**block, block["type"]: ""}
        if block["type"] == "thinking":
            empty["signature"] = ""
        return [*events, {"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": empty}]

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        index, block, events = len(self.blocks) - 1, self.blocks[-1], []
        if self.open == "thinking":
            block["signature"] = signature(block["thinking"])
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": block["signature"]}})  # fmt: skip
        self.open = None
        return [*events, {"type": "content_block_stop", "index": index}]

    def _append(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = [] if self.open == kind else self._start({"type": kind, kind: ""})
        self.blocks[-1][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        return [*events, {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}]

    def feed(self, parsed: Any) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if parsed.reasoning and self.show_thinking:
            events += self._append("thinking", parsed.reasoning)
        if parsed.content:
            text = self.held + parsed.content
            body = text.rstrip()
            self.held = text[len(body) :]
            if body:
                events += self._append("text", body)
        for call in parsed.tool_calls:
            if self.single_tool and self.num_tools:
                continue
            arguments = tool_input(call.arguments)
            if arguments is None:
                events += self._append("text", self.held + call.arguments)
                self.held = ""
                continue
            self.num_tools += 1
            self.held = ""
            block = tool_use_block(call.name, arguments)
            events += self._start(block)
            events.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                           "delta": {"type": "input_json_delta", "partial_json": json.dumps(arguments)}})  # fmt: skip
        return events

    def finish(self) -> list[dict[str, Any]]:
        events = []
        if self.held and not self.num_tools:
            events += self._append("text", self.held)
        self.held = ""
        return events + self.close()


# --- routes ---------------------------------------------------------------------------------------------------------


async def count_message_tokens(state: ServerState, body: CountTokensRequest) -> Response:
    state = await state.engine_for(body.model)
    chat_body = to_chat_request(body)
    check_tool_choice(chat_body)
    prompt_ids = await render_prompt(state, chat_body)
    return JSONResponse({"input_tokens": len(prompt_ids)})


async def create_message(state: ServerState, body: MessagesRequest, request: Request) -> Response:
    chat_body = to_chat_request(body)
    prepared: PreparedChat = await prepare_chat(state, chat_body, request, id_prefix="msg_")
    state = prepared.state
    (parser,) = prepared.parsers
    fmt = state.chat_format
    model = state.served_model_name
    message_id = prepared.request_id
    show_thinking = fmt.has_reasoning and shows_thinking(body)
    single_tool = body.tool_choice is not None and body.tool_choice.disable_parallel_tool_use
    writer = BlockWriter(show_thinking, single_tool)
    stops = body.stop_sequences or []
    token_ids: list[int] = []

    def feed(delta: Any) -> list[dict[str, Any]]:
        token_ids.extend(delta.token_ids)
        events = writer.feed(parser.feed(delta))
        return events + writer.finish() if delta.finished else events

    async def stop_reason(finish_reason: str | None) -> tuple[str, str | None]:
        if writer.num_tools:
            return "tool_use", None
        if finish_reason == "length":
            return "max_tokens", None
        if finish_reason == "stop" and stops:
            text = await state.off_loop(state.tokenizer.decode, token_ids, fmt.skip_special_tokens)
            stop = matched_stop(text, stops)
            if stop is not None:
                return "stop_sequence", stop
        return "end_turn", None

    def message(content: list[dict[str, Any]], reason: str | None, stop: str | None, usage: dict) -> dict[str, Any]:
        return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": reason, "stop_sequence": stop, "usage": usage}  # fmt: skip

    async def respond(fanout: Fanout) -> Response:
        counter = UsageCounter(prepared.subs, 1, request)
        if body.stream:
            return StreamingResponse(stream_with_cleanup(fanout, _stream(fanout, counter), anthropic_error_events),
                                     media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)  # fmt: skip
        finish: list[str | None] = [None]

        async def collect() -> None:
            async for item in fanout.deltas():
                assert item is not None
                _, delta = item
                counter.add(0, delta)
                feed(delta)
                if delta.finished:
                    finish[0] = delta.finish_reason

        await until_disconnected(request, collect(), fanout.abort)
        counter.record(state.metrics)
        prepared.usage(counter)
        reason, stop = await stop_reason(finish[0])
        logger.info("%s: %d prompt tokens, %d completion tokens", message_id, counter.prompt_tokens,
                    counter.completion_tokens)  # fmt: skip
        return JSONResponse(message(writer.blocks, reason, stop, anthropic_usage(counter)))

    async def _stream(fanout: Fanout, counter: UsageCounter) -> AsyncIterator[bytes]:
        started = False
        finish_reason = None
        async for item in fanout.deltas(keep_alive=sse.KEEP_ALIVE_SECONDS):
            if item is None:
                yield sse.named_event({"type": "ping"})
                continue
            _, delta = item
            counter.add(0, delta)
            if not started:  # after the first delta: the count of prompt tokens read from the cache is known
                started = True
                yield sse.named_event({"type": "message_start",
                                 "message": message([], None, None, anthropic_usage(counter, final=False))})  # fmt: skip
                yield sse.named_event({"type": "ping"})
            for event in feed(delta):
                yield sse.named_event(event)
            if delta.finished:
                finish_reason = delta.finish_reason
        counter.record(state.metrics)
        prepared.usage(counter)
        reason, stop = await stop_reason(finish_reason)
        yield sse.named_event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop},
                         "usage": anthropic_usage(counter)})  # fmt: skip
        yield sse.named_event({"type": "message_stop"})

    return await run_fanout(state, request, prepared.subs, respond)
