"""Tool-call parsers: pull function calls out of a model's streamed answer text into OpenAI-style `tool_calls`.

Same shape as the reasoning parsers (`feed(delta_text) -> ParsedDelta`, `finish()`), so streaming and whole-text
parsing share one path and any chunking gives the same result. A call is emitted once it is complete; text that
cannot be parsed (bad JSON, an unterminated call at the end) goes back into `content` unchanged. Registry:
`TOOL_PARSERS`, chosen by model family or `--tool-call-parser`.

Formats (docs/models.md §2.6):
- `deepseek_v3`: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`, a newline
  and ARGS in a ```json fence, `<｜tool▁call▁end｜>`; finally `<｜tool▁calls▁end｜>`. The later
  `NAME<｜tool▁sep｜>ARGS` call form (V3.1) is accepted too.
- `hermes` (Qwen2.5, Hermes): `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, possibly several.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from hearth.chat.reasoning import ANSWER, ParsedDelta, ReasoningParser, held_prefix

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"


@dataclass(slots=True)
class ToolCall:
    """One function call: `arguments` is a JSON object as text, as in OpenAI's API."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: str = "function"


class ToolCallParser(Protocol):
    def feed(self, delta_text: str) -> ParsedDelta:
        """Parse the next piece of answer text; returns content that is certainly not a call, and finished calls."""
        ...

    def finish(self) -> ParsedDelta:
        """End of generation: anything held back that never became a call is content."""
        ...


def _arguments(value) -> str | None:
    """A JSON object (or its text) → canonical JSON text; None if it is not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


class TaggedToolParser:
    """Calls written as `call_begin BODY call_end`, optionally grouped inside `section_begin … section_end`.
    Subclasses give the tags and `parse_call(body) -> ToolCall | None`."""

    section_begin: str | None = None
    section_end: str | None = None
    call_begin: str = ""
    call_end: str = ""

    def __init__(self) -> None:
        self.state = "content"  # "content" | "section" (between calls) | "call"
        self.buffer = ""
        self.raw = ""  # text consumed since the current call or section began, returned as content if it fails

    def parse_call(self, body: str) -> ToolCall | None:
        raise NotImplementedError

    def feed(self, delta_text: str) -> ParsedDelta:
        self.buffer += delta_text
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        return self._drain(final=True)

    def _openers(self) -> list[str]:
        return [t for t in (self.section_begin, self.call_begin) if t]

    def _fail(self, out: ParsedDelta) -> None:
        """Give up on the current call or section: its raw text is content, and scanning resumes after it."""
        out.content += self.raw
        self.raw, self.state = "", "content"

    def _drain(self, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        while True:
            if self.state == "content":
                found = [(i, t) for t in self._openers() if (i := self.buffer.find(t)) >= 0]
                if found:
                    idx, tag = min(found)
                    out.content += self.buffer[:idx]
                    self.buffer, self.raw = self.buffer[idx + len(tag) :], tag
                    self.state = "section" if tag == self.section_begin else "call"
                    continue
                keep = 0 if final else max(held_prefix(self.buffer, t) for t in self._openers())
                out.content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return out
            if self.state == "section":
                head = self.buffer.lstrip()
                skipped = self.buffer[: len(self.buffer) - len(head)]
                if head.startswith(self.call_begin):
                    self.raw += skipped + self.call_begin
                    self.buffer, self.state = head[len(self.call_begin) :], "call"
                    continue
                if self.section_end and head.startswith(self.section_end):
                    self.buffer, self.raw, self.state = head[len(self.section_end) :], "", "content"
                    continue
                tags = [self.call_begin] + ([self.section_end] if self.section_end else [])
                if not final and any(t.startswith(head) for t in tags):  # nothing decisive yet
                    return out
                self._fail(out)
                continue
            idx = self.buffer.find(self.call_end)  # state "call"
            if idx < 0:
                if not final:
                    return out
                self.raw += self.buffer
                self.buffer = ""
                self._fail(out)
                continue
            body = self.buffer[:idx]
            self.buffer = self.buffer[idx + len(self.call_end) :]
            call = self.parse_call(body)
            if call is None:
                self.raw += body + self.call_end
                self._fail(out)
                continue
            out.tool_calls.append(call)
            self.raw = ""
            self.state = "section" if self.section_begin else "content"


class DeepSeekV3ToolParser(TaggedToolParser):
    section_begin, section_end = CALLS_BEGIN, CALLS_END
    call_begin, call_end = CALL_BEGIN, CALL_END
    _FENCE = re.compile(r"\s*```(?:json)?\s*\n?(.*?)\s*```\s*", re.DOTALL)

    def parse_call(self, body: str) -> ToolCall | None:
        kind, sep, rest = body.partition(TOOL_SEP)
        if not sep:
            return None
        if kind.strip() == "function":  # V3 / R1: function<sep>NAME\n```json\nARGS\n```
            name, _, args = rest.partition("\n")
            fence = self._FENCE.fullmatch(args)
            args = fence.group(1) if fence else args
        else:  # V3.1: NAME<sep>ARGS
            name, args = kind, rest
        name, arguments = name.strip(), _arguments(args)
        if not name or re.search(r"\s", name) or arguments is None:
            return None
        return ToolCall(name, arguments)


class HermesToolParser(TaggedToolParser):
    call_begin, call_end = "<tool_call>", "</tool_call>"

    def parse_call(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        arguments = _arguments(obj.get("arguments", obj.get("parameters", {})))
        return None if arguments is None else ToolCall(obj["name"], arguments)


class ChainedParser:
    """A reasoning parser, then a tool-call parser on its content: the parser stack of a chat response."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    def feed(self, delta_text: str) -> ParsedDelta:
        return self._through_tools(self.reasoning.feed(delta_text) if self.reasoning else ParsedDelta(content=delta_text))

    @property
    def phase(self) -> str:
        return self.reasoning.phase if self.reasoning else ANSWER

    def finish(self) -> ParsedDelta:
        out = self._through_tools(self.reasoning.finish() if self.reasoning else ParsedDelta())
        return out.extend(self.tools.finish()) if self.tools else out

    def _through_tools(self, parsed: ParsedDelta) -> ParsedDelta:
        if self.tools is None:
            return parsed
        out = self.tools.feed(parsed.content)
        return ParsedDelta(parsed.reasoning, out.content, parsed.tool_calls + out.tool_calls)


TOOL_PARSERS: dict[str, type] = {"deepseek_v3": DeepSeekV3ToolParser, "hermes": HermesToolParser}
