"""POST /v1/responses (OpenAI's Responses API, gpt-oss's own) and GET / DELETE /v1/responses/{id}.

Built on the chat path, not beside it: the request's items become a chat request (`ChatCompletionRequest`: messages
with past reasoning, assistant tool calls and tool results; tools, tool_choice, response_format from `text.format`,
reasoning effort), which `chat.chat_subrequests` renders, checks against the context and the key's token budget and
turns into engine requests; the chat path's parsers split the output into reasoning, text and tool calls, and this
module writes those as Responses output items (`reasoning`, `message`, `function_call`), whole or as the stream of
events that builds them. One `OutputBuilder` serves both, so a streamed response ends with the same items as the
unstreamed one. `store` keeps the response and its conversation for `previous_response_id` (response_store.py).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError, field_validator, model_validator

from hearth.api import sse
from hearth.api.chat import REASONING_EFFORT, ChoiceParser, chat_subrequests, request_tools
from hearth.api.errors import APIError, describe_validation_error
from hearth.api.fanout import Fanout, UsageCounter, run_fanout, stream_with_cleanup, until_disconnected
from hearth.api.protocol import ChatCompletionRequest, OpenAIModel, check_json_values

if TYPE_CHECKING:
    from hearth.api.response_store import ResponseStore
    from hearth.api.state import ServerState

logger = logging.getLogger(__name__)

MAX_METADATA = 16  # pairs; keys up to 64 characters, values up to 512, as OpenAI allows
LOCAL_OWNER = ""  # the owner of stored responses when the server runs without keys


# --- request ----------------------------------------------------------------------------------------------------------


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise ValueError("text.format of type json_schema needs a name and a schema")
        return self


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ReasoningConfig(OpenAIModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(OpenAIModel):
    model: str | None = None  # None: the served model
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_values(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_json_values({k: v for k, v in data.items() if k in cls.model_fields})
        return data

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, meta: dict[str, str] | None) -> dict[str, str] | None:
        if meta and (len(meta) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in meta.items())):
            raise ValueError(f"metadata holds at most {MAX_METADATA} pairs, keys up to 64 characters, values up to 512")
        return meta


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_parts(content: Any, param: str, allowed: tuple[str, ...]) -> str:
    """A message's content (a string, or a list of text parts) as one string; other parts are a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{param} must be a string or a list of content parts", 400, param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("refusal" if kind == "refusal" else "text") if kind in allowed else None
        if not isinstance(text, str):
            raise APIError(f"content parts of type {kind!r} are not supported here; only {', '.join(allowed)} parts with "
                           "a text are", 400, f"{param}[{j}]")  # fmt: skip
        texts.append(text)
    return "\n".join(texts)


def _item_id(item: dict[str, Any], prefix: str) -> str:
    """The item's own id when it has one, else a new one: stored items all have ids (input_items pages by them)."""
    given = item.get("id")
    return given if isinstance(given, str) and given else _new_id(prefix)


def _str_field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(f"{param}.{name} is missing or not a string", 400, f"{param}.{name}")
    return value


def normalize_items(value: str | list[dict[str, Any]] | None, param: str = "input") -> list[dict[str, Any]]:
    """The request's input as stored items, each with its type and an id: a string is one user message; messages,
    function calls, their outputs and reasoning items are checked and written in one shape."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "id": _new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]  # fmt: skip
    items = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"{where}.role must be user, system, developer or assistant, not {role!r}", 400,
                               f"{where}.role")  # fmt: skip
            assistant = role == "assistant"
            allowed = ("output_text", "refusal") if assistant else ("input_text",)
            text = _text_parts(item.get("content"), f"{where}.content", allowed)
            part = {"type": "output_text", "text": text, "annotations": []} if assistant else {"type": "input_text",
                                                                                              "text": text}  # fmt: skip
            items.append({"type": "message", "id": _item_id(item, "msg"), "role": role,
                          "status": "completed", "content": [part]})  # fmt: skip
        elif kind == "function_call":
            call = {name: _str_field(item, name, where) for name in ("call_id", "name", "arguments")}
            items.append({"type": "function_call", "id": _item_id(item, "fc"), **call, "status": "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_parts(output, f"{where}.output", ("input_text",))
            items.append({"type": "function_call_output", "id": _item_id(item, "fco"),
                          "call_id": _str_field(item, "call_id", where), "output": text, "status": "completed"})  # fmt: skip
        elif kind == "reasoning":
            content = item.get("content") or item.get("summary") or []
            kinds = ("reasoning_text", "summary_text")
            text = _text_parts(content, f"{where}.{'content' if item.get('content') else 'summary'}", kinds)
            items.append({"type": "reasoning", "id": _item_id(item, "rs"), "summary": [],
                          "content": [{"type": "reasoning_text", "text": text}]})  # fmt: skip
        else:
            raise APIError(f"{where} has type {kind!r}; supported input items are message, function_call, "
                           "function_call_output and reasoning", 400, f"{where}.type")  # fmt: skip
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as chat messages: a turn's reasoning, text and function calls become one assistant message (reasoning_content,
    content, tool_calls); a function call's output becomes a tool message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    assistant: dict[str, Any] | None = None  # the assistant message the next assistant item may join
    names: dict[str, str] = {}

    def turn(*taken: str) -> dict[str, Any]:
        """The open assistant message, or a new one when none is open or it already has one of `taken`."""
        nonlocal assistant
        if assistant is None or any(assistant.get(name) for name in taken):
            assistant = {"role": "assistant", "content": ""}
            messages.append(assistant)
        return assistant

    for item in items:
        kind = item["type"]
        text = "".join(p["text"] for p in item.get("content") or [])
        if kind == "reasoning":
            turn("reasoning_content", "content", "tool_calls")["reasoning_content"] = text
        elif kind == "message" and item["role"] == "assistant":
            turn("content", "tool_calls")["content"] = text
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            turn().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            assistant = None
            if item["call_id"] not in names:
                raise APIError(f"no function call with call_id {item['call_id']!r} comes before its output", 400,
                               "input")  # fmt: skip
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "name": names[item["call_id"]],
                             "content": item["output"]})  # fmt: skip
        else:  # a user, system or developer message
            assistant = None
            messages.append({"role": item["role"], "content": text})
    return messages


def chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """`tools` and `tool_choice` in the chat request's shape; only function tools exist here."""
    tools = None
    if body.tools is not None:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise APIError(f"tools[{i}] has type {tool.get('type')!r}; only function tools are supported", 400,
                               f"tools[{i}].type")  # fmt: skip
            if not isinstance(tool.get("name"), str):
                raise APIError(f"tools[{i}].name is missing or not a string", 400, f"tools[{i}].name")
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            tools.append({"type": "function", "function": fn})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}", 400,
                           "tool_choice")  # fmt: skip
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    messages = chat_messages(body.instructions, items)
    if not messages:
        raise APIError("the request has no input: give `input` (or `instructions`, or a previous_response_id)", 400,
                       "input")  # fmt: skip
    tools, choice = chat_tools(body)
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "tools": tools, "tool_choice": choice,
                              "parallel_tool_calls": body.parallel_tool_calls, "user": body.user,
                              "max_completion_tokens": body.max_output_tokens}  # fmt: skip
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    if body.reasoning is not None and body.reasoning.effort is not None:
        fields["reasoning_effort"] = REASONING_EFFORT[body.reasoning.effort]
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        fields["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            schema = {"name": fmt.name, "schema": fmt.json_schema, "description": fmt.description, "strict": fmt.strict}
            fields["response_format"]["json_schema"] = {k: v for k, v in schema.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:  # the items were checked above; this names what is left
        message, _ = describe_validation_error(e.errors(include_url=False))
        raise APIError(message, 400, "input") from e


# --- output -----------------------------------------------------------------------------------------------------------


class OutputBuilder:
    """One completion's parsed deltas as Responses output items, and the stream events that build them.

    Reasoning text opens a `reasoning` item, answer text a `message`, each kept open while more of the same comes; a
    complete tool call is one `function_call` item. `feed` and `finish` return the events (dicts without their
    sequence number); `items` holds the finished items.
    """

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.text = ""

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.items)
        item["status"] = status
        base = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": self.text}
            item["content"] = [part]
            events = [{"type": "response.reasoning_text.done", **base, "text": self.text}]
        else:
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events = [{"type": "response.output_text.done", **base, "text": self.text, "logprobs": []}]
        self.items.append(item)
        return [*events, {"type": "response.content_part.done", **base, "part": part},
                {"type": "response.output_item.done", "output_index": index, "item": item}]  # fmt: skip

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close("completed")
            if kind == "reasoning":
                item: dict[str, Any] = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": []}
                part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
            else:
                item = {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress",
                        "content": []}  # fmt: skip
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.open, self.text = item, ""
            index = len(self.items)
            events += [{"type": "response.output_item.added", "output_index": index, "item": dict(item)},
                       {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": part}]  # fmt: skip
        self.text += text
        assert self.open is not None
        delta = {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0, "delta": text}
        if kind == "reasoning":
            return [*events, {"type": "response.reasoning_text.delta", **delta}]
        return [*events, {"type": "response.output_text.delta", **delta, "logprobs": []}]

    def feed(self, parsed: Any) -> list[dict[str, Any]]:
        events = []
        if parsed.reasoning:
            events += self._text("reasoning", parsed.reasoning)
        if parsed.content:
            events += self._text("message", parsed.content)
        for call in parsed.tool_calls:
            events += self._close("completed")
            index = len(self.items)
            item = {"type": "function_call", "id": _new_id("fc"), "call_id": _new_id("call"), "name": call.name,
                    "arguments": "", "status": "in_progress"}  # fmt: skip
            events.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
            item.update(arguments=call.arguments, status="completed")
            base = {"item_id": item["id"], "output_index": index}
            events += [{"type": "response.function_call_arguments.delta", **base, "delta": call.arguments},
                       {"type": "response.function_call_arguments.done", **base, "name": call.name,
                        "arguments": call.arguments},
                       {"type": "response.output_item.done", "output_index": index, "item": item}]  # fmt: skip
            self.items.append(item)
        return events

    def finish(self, incomplete: bool) -> list[dict[str, Any]]:
        """Close the open item; a completion that produced nothing still answers with an (empty) message."""
        events = self._close("incomplete" if incomplete else "completed")
        if not self.items:
            events += self._text("message", "")
            events += self._close("incomplete" if incomplete else "completed")
        return events


def incomplete_reason(finish_reason: str | None) -> str | None:
    """Why a response is incomplete: its token limit ("length"), or the engine ending it early ("abort" when the
    request was aborted); None when it is complete (a stop token or string)."""
    if finish_reason == "length":
        return "max_output_tokens"
    return None if finish_reason in ("stop", None) else finish_reason


def response_object(body: ResponsesRequest, response_id: str, created_at: int, model: str, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None, stored: bool,
                    error: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:  # fmt: skip
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "max_tool_calls": None,
        "model": model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                      "summary": body.reasoning.summary if body.reasoning else None},
        "store": stored,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": choice, "tools": body.tools or [],
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {},
    }  # fmt: skip


# --- routes -----------------------------------------------------------------------------------------------------------


def request_owner(request: Request) -> str:
    """Who owns what this request stores or reads: its API key's id, or the single local owner without keys."""
    return request.scope.get("state", {}).get("key_id") or LOCAL_OWNER


def not_found(response_id: str) -> APIError:
    return APIError(f"Response with id {response_id!r} not found.", 404, "response_id")


async def find_response(store: ResponseStore | None, response_id: str, request: Request) -> Any:
    if store is None:
        return None
    return await anyio.to_thread.run_sync(store.get, response_id, request_owner(request))


async def create_response(state: ServerState, store: ResponseStore | None, body: ResponsesRequest,
                          request: Request) -> Response:  # fmt: skip
    state = await state.engine_for(body.model)
    if body.background:
        raise APIError("background responses are not supported", 400, "background")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await find_response(store, body.previous_response_id, request)
        if previous is None:
            hint = "" if store is not None else " (this server keeps no responses: it runs with --no-store)"
            raise APIError(f"Previous response with id {body.previous_response_id!r} not found.{hint}", 400,
                           "previous_response_id", "previous_response_not_found")  # fmt: skip
        history = previous.continuation
    input_items = normalize_items(body.input)
    conversation = history + input_items
    chat_body = chat_request(body, conversation)
    response_id = _new_id("resp")
    subs, tool_parser = await chat_subrequests(state, chat_body, request, response_id, "input")
    fmt = state.chat_format
    parser = ChoiceParser(state, request_tools(chat_body) is not None, tool_parser)
    builder = OutputBuilder()
    model = state.served_model_name
    created_at = int(time.time())
    keep = body.store and store is not None
    owner = request_owner(request)

    def usage(counter: UsageCounter) -> dict[str, Any]:
        if fmt.has_reasoning:
            counter.reasoning_tokens = parser.num_reasoning_tokens
        u = counter.usage()
        return {"input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": counter.reasoning_tokens},
                "total_tokens": u.total_tokens}  # fmt: skip

    async def finish(counter: UsageCounter, reason: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The final response (stored when asked) and the events that close its last item."""
        incomplete = incomplete_reason(reason)
        events = builder.finish(incomplete is not None)
        counter.record(state.metrics)
        status = "completed" if incomplete is None else "incomplete"
        result = response_object(body, response_id, created_at, model, status, builder.items, usage(counter), keep,
                                 incomplete=incomplete)  # fmt: skip
        logger.info("%s: %d input tokens, %d output tokens, %d items, %s", response_id, counter.prompt_tokens,
                    counter.completion_tokens, len(builder.items), status)  # fmt: skip
        if keep:
            assert store is not None
            await anyio.to_thread.run_sync(store.put, owner, result, conversation, len(input_items))
        return result, events

    async def respond(fanout: Fanout) -> Response:
        counter = UsageCounter(subs, 1, request)
        if body.stream:
            return StreamingResponse(stream_with_cleanup(fanout, _stream(fanout, counter)), media_type=sse.MEDIA_TYPE,
                                     headers=sse.HEADERS)  # fmt: skip
        reason: list[str | None] = [None]

        async def collect() -> None:
            async for item in fanout.deltas():
                assert item is not None
                _, delta = item
                counter.add(0, delta)
                builder.feed(parser.feed(delta))
                if delta.finished:
                    reason[0] = delta.finish_reason

        await until_disconnected(request, collect(), fanout.abort)
        result, _ = await finish(counter, reason[0])
        return JSONResponse(result)

    async def _stream(fanout: Fanout, counter: UsageCounter) -> AsyncIterator[bytes]:
        numbers = itertools.count()

        def event(data: dict[str, Any]) -> bytes:
            data["sequence_number"] = next(numbers)
            return sse.named_event(data)

        start = response_object(body, response_id, created_at, model, "in_progress", [], None, keep)
        yield event({"type": "response.created", "response": start})
        yield event({"type": "response.in_progress", "response": start})
        reason = None
        try:
            async for item in fanout.deltas(keep_alive=sse.KEEP_ALIVE_SECONDS):
                if item is None:
                    yield sse.KEEP_ALIVE
                    continue
                _, delta = item
                counter.add(0, delta)
                for e in builder.feed(parser.feed(delta)):
                    yield event(e)
                if delta.finished:
                    reason = delta.finish_reason
        except APIError as e:  # the engine failed the request mid-stream
            yield event({"type": "error", "code": e.code or "server_error", "message": e.message, "param": e.param})
            error = {"code": "server_error", "message": e.message}
            failed = response_object(body, response_id, created_at, model, "failed", builder.items, None, False, error)
            yield event({"type": "response.failed", "response": failed})
            return
        result, events = await finish(counter, reason)
        for e in events:
            yield event(e)
        kind = "response.incomplete" if result["status"] == "incomplete" else "response.completed"
        yield event({"type": kind, "response": result})

    return await run_fanout(state, request, subs, respond)


async def get_response(store: ResponseStore | None, response_id: str, request: Request) -> JSONResponse:
    found = await find_response(store, response_id, request)
    if found is None:
        raise not_found(response_id)
    return JSONResponse(found.response)


async def list_input_items(store: ResponseStore | None, response_id: str, request: Request, limit: int = 20,
                           order: str = "desc", after: str | None = None) -> JSONResponse:  # fmt: skip
    found = await find_response(store, response_id, request)
    if found is None:
        raise not_found(response_id)
    if not 1 <= limit <= 100:
        raise APIError("limit must be between 1 and 100", 400, "limit")
    if order not in ("asc", "desc"):
        raise APIError("order must be asc or desc", 400, "order")
    items = found.input_items if order == "asc" else found.input_items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(f"no input item with id {after!r} in this response", 400, "after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})  # fmt: skip


async def delete_response(store: ResponseStore | None, response_id: str, request: Request) -> JSONResponse:
    deleted = store is not None and await anyio.to_thread.run_sync(store.delete, response_id, request_owner(request))
    if not deleted:
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
