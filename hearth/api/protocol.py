"""Pydantic models of the OpenAI API as Hearth serves it: chat and legacy completions, requests, responses, chunks.

Field names, defaults and shapes follow OpenAI's API reference. Ranges are checked here, so a bad value comes back
as a 400 naming the field (see errors.py). Before the fields are validated, `check_json_values` walks the raw body for
what Python's JSON parser lets through but nothing downstream can handle: lone UTF-16 surrogates, NaN and infinities,
and deep nesting inside the free-form fields (template kwargs, tool schemas, message parts).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hearth.chat.template import RESERVED_TEMPLATE_NAMES

MAX_N = 16  # choices per request
MAX_CHOICES = 128  # prompts × n of one completions request
MAX_LOGPROBS = 20
MAX_NESTING = 64  # levels of objects and arrays in a request body

BODY_VALUE_ERROR = "hearth_body_value"  # the error type of the checks below; ctx["param"] names the field
_SURROGATE = re.compile("[\ud800-\udfff]")
_INTS = {int, bool, type(None)}
_NUMBERS = {int, float, bool}


def _body_error(message: str, param: str | None) -> PydanticCustomError:
    return PydanticCustomError(BODY_VALUE_ERROR, message, {"param": param})  # type: ignore[arg-type]


def _path(parts: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; a key's lone surrogates are written as \\u escapes."""
    out = ""
    for part in parts:
        if isinstance(part, str) and _SURROGATE.search(part):
            part = part.encode("utf-8", "backslashreplace").decode()
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _check_str(value: str, parts: tuple) -> None:
    if not value.isascii() and _SURROGATE.search(value):
        param = _path(parts)
        raise _body_error(f"{param or 'the request body'} contains a lone UTF-16 surrogate (an unpaired \\ud800-"
                          "\\udfff escape), which is not valid Unicode text", param)  # fmt: skip


def check_json_values(data: Any) -> None:
    """Refuse lone surrogates (in strings and keys), NaN and ±Infinity, and nesting deeper than MAX_NESTING, naming
    the first offending field. Iterative, so no depth overflows the stack; arrays of numbers are checked at C speed."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, parts, depth = stack.pop()
        kind = type(value)
        if kind is str:
            _check_str(value, parts)
        elif kind is float:
            if not math.isfinite(value):
                param = _path(parts)
                raise _body_error(f"{param or 'the request body'} is {value}; JSON numbers must be finite", param)
        elif kind is dict or kind is list:
            if depth >= MAX_NESTING:
                param = _path(parts)
                raise _body_error(f"{param or 'the request body'} is nested more than {MAX_NESTING} levels deep", param)
            if kind is dict:
                for key, item in value.items():
                    _check_str(key, (*parts, key))
                    stack.append((item, (*parts, key), depth + 1))
                continue
            kinds = set(map(type, value))
            if kinds <= _INTS or (kinds <= _NUMBERS and all(map(math.isfinite, value))):
                continue
            if kinds == {str} and not _SURROGATE.search("".join(value)):
                continue
            stack.extend((item, (*parts, i), depth + 1) for i, item in enumerate(value))


def _omit_none(value: Any) -> bool:
    return value is None


class OpenAIModel(BaseModel):
    # unknown request fields (logit_bias, store, metadata, ...) are accepted and ignored, as most OpenAI-compatible
    # servers do, so clients written for OpenAI keep working
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# --- requests -------------------------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenAIModel):
    name: str
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class ChatMessage(OpenAIModel):
    """One input message. `content` is a string or a list of parts; only text parts are supported."""

    model_config = ConfigDict(extra="allow")  # templates may read extra keys (e.g. `thinking`)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions requests."""

    model: str | None = None  # None: the served model
    keep_alive: int | float | str | None = None  # how long the model stays loaded after this request ("10m", 0, -1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _check_values(cls, data: Any) -> Any:
        if isinstance(data, dict):  # only the fields the model keeps: ignored ones are never read, so never walked
            check_json_values({k: v for k, v in data.items() if k in cls.model_fields})
        return data

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, as vLLM accepts

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_names(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in kwargs or {}:
            if name in RESERVED_TEMPLATE_NAMES:
                hint = "; use the reasoning_effort field" if name == "reasoning_effort" else ""
                raise _body_error(f"chat_template_kwargs may not set {name!r}: the server sets it{hint}",
                                  f"chat_template_kwargs.{name}")  # fmt: skip
        return kwargs

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None for no logprobs, else the number of alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    response_format: ResponseFormat | None = None  # an extension (OpenAI's completions have none): JSON output
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


# --- responses ------------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None
    refusal: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, exclude_if=_omit_none)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    # sent (null until the last chunk) only when stream_options.include_usage is set, as OpenAI does
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "hearth"
    max_model_len: int | None = None
    capabilities: list[str] = Field(default_factory=list)  # "reasoning", "reasoning_effort", "tools"
    loaded: bool | None = None  # a server of several models: whether this one is loaded now


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
