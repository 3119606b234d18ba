"""Pydantic models of Anthropic's Messages API requests as Hearth serves them (POST /v1/messages, .../count_tokens).

Field names, shapes and ranges follow Anthropic's API: `max_tokens` is required on /v1/messages, `temperature` is in
[0, 1], content is a string or a list of typed blocks (text, tool_use, tool_result, thinking, redacted_thinking; any
other type, images included, is a 400 naming the block), tools carry an `input_schema`; `thinking` is enabled (with
a budget), adaptive or disabled; `output_config` carries an effort and a JSON schema for the answer. Unknown fields
are ignored, as for OpenAI's requests. The raw body is walked by protocol.py's `check_json_values` first (lone
surrogates, NaN, nesting). Responses are built as plain dicts in messages.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from hearth.api.protocol import BODY_VALUE_ERROR, check_json_values

MAX_STOP_SEQUENCES = 16


class AnthropicModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextBlock(AnthropicModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(AnthropicModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(AnthropicModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(b.text for b in self.content)


class ThinkingBlock(AnthropicModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                         Field(discriminator="type")]  # fmt: skip


class InputMessage(AnthropicModel):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1)]

    @property
    def blocks(self) -> list[Any]:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else list(self.content)


BLOCK_MODELS: dict[str, type[AnthropicModel]] = {
    "text": TextBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock,
}
BLOCK_TYPES = tuple(BLOCK_MODELS)


def _body_error(message: str, param: str) -> PydanticCustomError:
    return PydanticCustomError(BODY_VALUE_ERROR, message, {"param": param})  # type: ignore[arg-type]


def _check_blocks(messages: Any) -> None:
    """Each content block on its own, so that a 400 names the block and its field: a type Hearth does not take (image,
    document, ...) with the types it does, or the block's first bad field (rather than a failed match against every
    alternative of the content field)."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            kind = block.get("type") if isinstance(block, dict) else None
            param = f"messages[{i}].content[{j}]"
            if isinstance(kind, str) and kind not in BLOCK_TYPES:
                raise _body_error(f"{param}.type: content blocks of type {kind!r} are not supported; supported: "
                                  f"{', '.join(BLOCK_TYPES)}", f"{param}.type")  # fmt: skip
            inner = block.get("content") if kind == "tool_result" else None
            for k, part in enumerate(inner if isinstance(inner, list) else []):
                part_kind = part.get("type") if isinstance(part, dict) else None
                if part_kind != "text":
                    raise _body_error(f"{param}.content[{k}]: a tool_result's content blocks must be text blocks, not "
                                      f"{part_kind!r}", f"{param}.content[{k}]")  # fmt: skip
            if kind in BLOCK_TYPES:
                try:
                    BLOCK_MODELS[kind].model_validate(block)
                except ValidationError as e:
                    errors = e.errors()
                    first = errors[0]
                    # a union's alternatives each report an error: name the field they share, not an alternative
                    loc = tuple(first["loc"])
                    for other in errors[1:]:
                        n = 0
                        while n < min(len(loc), len(other["loc"])) and loc[n] == other["loc"][n]:
                            n += 1
                        loc = loc[:n]
                    path = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
                    if first["type"] == "missing" and len(errors) == 1:
                        raise _body_error(f"missing required field: {path}", path) from None
                    raise _body_error(f"invalid value for {path}: {first['msg']}", path) from None


class ToolParam(AnthropicModel):
    """A client tool. Anthropic's server tools (web search, code execution, ...) have other types and are refused."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoiceAuto(AnthropicModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(AnthropicModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(AnthropicModel):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(AnthropicModel):
    type: Literal["none"]
    disable_parallel_tool_use: bool = False


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(AnthropicModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(AnthropicModel):
    """The model decides how much to think: the reasoning model's own default."""

    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(AnthropicModel):
    type: Literal["disabled"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]


class OutputFormat(AnthropicModel):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(AnthropicModel):
    user_id: str | None = None


class CountTokensRequest(AnthropicModel):
    """The fields that decide the prompt: what /v1/messages/count_tokens takes."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_values(cls, data: Any) -> Any:
        if isinstance(data, dict):  # only the fields the model keeps: ignored ones are never read, so never walked
            check_json_values({k: v for k, v in data.items() if k in cls.model_fields})
            _check_blocks(data.get("messages"))
        return data

    @property
    def system_text(self) -> str:
        if self.system is None:
            return ""
        return self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise _body_error(f"thinking.budget_tokens ({self.thinking.budget_tokens}) must be less than max_tokens "
                              f"({self.max_tokens})", "thinking.budget_tokens")  # fmt: skip
        return self
