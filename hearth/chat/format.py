"""ChatFormat: how one model's chats become prompt ids and how its output text splits into reasoning, answer and tool
calls. Chosen from the model: gpt-oss speaks harmony; templates that mention <think> get the think parser (starting
inside the thought when the generation prompt already opens it); DeepSeek or Hermes tool-call markup in the template
selects that tool-call parser. `--reasoning-parser` / `--tool-call-parser` override the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hearth.chat.reasoning import PARSERS, ThinkParser
from hearth.chat.tool_calls import TOOL_PARSERS, ChainedParser

HARMONY_STOPS = ("<|return|>", "<|call|>")


@dataclass
class ChatFormat:
    template: Any = None  # ChatTemplate, unless harmony
    harmony: bool = False
    reasoning_parser: str | None = None
    tool_parser: str | None = None
    starts_in_reasoning: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def skip_special_tokens(self) -> bool:
        return not self.harmony  # the harmony parser reads the channel markup

    @property
    def has_reasoning(self) -> bool:
        return self.harmony or self.reasoning_parser is not None

    def render(self, tokenizer, messages: list[dict], tools: list[dict] | None = None,
               reasoning_effort: str | None = None, **kwargs) -> list[int]:  # fmt: skip
        """Prompt token ids for a conversation (generation prompt included)."""
        if self.harmony:
            from hearth.chat.harmony import render_ids

            effort = reasoning_effort if reasoning_effort in ("low", "medium", "high") else "medium"
            encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
            return render_ids(messages, encode, tools=tools, reasoning_effort=effort)
        if reasoning_effort is not None:
            kwargs["reasoning_effort"] = reasoning_effort
        text = self.template.render(messages, add_generation_prompt=True, tools=tools, **kwargs)
        return tokenizer.encode(text, add_special_tokens=False)

    def parser(self, with_tools: bool):
        """A fresh output parser for one choice (`feed(text)` / `finish()`), or None to pass text through."""
        if self.harmony:
            return PARSERS["harmony"]()
        reasoning = None
        if self.reasoning_parser == "think":
            reasoning = ThinkParser(starts_in_reasoning=self.starts_in_reasoning)
        elif self.reasoning_parser is not None:
            reasoning = PARSERS[self.reasoning_parser]()
        tools = TOOL_PARSERS[self.tool_parser]() if with_tools and self.tool_parser else None
        if reasoning is None and tools is None:
            return None
        return ChainedParser(reasoning, tools)


def _token_id(tokenizer, text: str) -> int | None:
    token_to_id = getattr(tokenizer, "token_to_id", None)
    return token_to_id(text) if token_to_id else None


def chat_format(tokenizer, template, architecture: str | None = None, reasoning_parser: str | None = None,
                tool_parser: str | None = None) -> ChatFormat:  # fmt: skip
    """Pick the format for a model; raises ValueError for an unknown parser name."""
    for name, table in ((reasoning_parser, PARSERS), (tool_parser, TOOL_PARSERS)):
        if name is not None and name not in table:
            raise ValueError(f"unknown parser {name!r} (known: {', '.join(table)})")
    if architecture == "GptOssForCausalLM" or reasoning_parser == "harmony":
        stops = [i for i in (_token_id(tokenizer, s) for s in HARMONY_STOPS) if i is not None]
        return ChatFormat(harmony=True, reasoning_parser="harmony", stop_token_ids=stops)
    source = getattr(template, "source", "") or ""
    fmt = ChatFormat(template=template, reasoning_parser=reasoning_parser, tool_parser=tool_parser)
    if fmt.reasoning_parser is None and "<think>" in source:
        fmt.reasoning_parser = "think"
    if fmt.reasoning_parser == "think":
        from hearth.chat.template import TemplateError

        try:
            probe = template.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
        except TemplateError:  # a broken template fails each request with a 400; it must not break the model card
            probe = ""
        fmt.starts_in_reasoning = probe.rstrip().endswith("<think>")
    if fmt.tool_parser is None:
        if "tool▁calls▁begin" in source:
            fmt.tool_parser = "deepseek_v3"
        elif "<tool_call>" in source:
            fmt.tool_parser = "hermes"
    return fmt
