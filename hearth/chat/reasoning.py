"""Reasoning parsers: split a model's streamed text into `reasoning` (the thought) and `content` (the answer).

One code path for both modes: a non-streaming response is `feed(whole_text)` followed by `finish()`. Parsers are
streaming state machines that hold back only what could still be the start of a tag, so any chunking of the same text
gives the same joined result. Registry: `PARSERS`, chosen by model family or `--reasoning-parser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class ParsedDelta:
    """What one piece of model output adds: thought text, answer text, and complete tool calls (tool_calls.ToolCall)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ParsedDelta) -> ParsedDelta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


REASONING, ANSWER, UNDECIDED = "reasoning", "answer", "undecided"  # ReasoningParser.phase


class ReasoningParser(Protocol):
    def feed(self, delta_text: str) -> ParsedDelta:
        """Parse the next piece of generated text; returns what can be emitted now."""
        ...

    def finish(self) -> ParsedDelta:
        """End of generation (stop, eos or max_tokens): flush whatever was held back."""
        ...

    @property
    def phase(self) -> str:
        """Where the text fed so far ends: inside the reasoning (REASONING), outside it (ANSWER), or in markup that
        does not yet say which (UNDECIDED: a tag or header still open). Reasoning tokens are counted from it."""
        ...


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkParser:
    """`<think>…</think>` (DeepSeek-R1, R1-Distill, Qwen3, …): the text inside is reasoning, the rest content.

    `starts_in_reasoning`: the chat template already emitted the opening tag (R1's generation prompt ends in
    `<think>\\n`), so the output starts inside the thought; a repeated opening tag at its start is dropped. Without it,
    the output is reasoning only if it opens with the tag (after whitespace); otherwise it is all content. A thought
    never closed (max_tokens) is all reasoning. Whitespace right after `<think>` and after `</think>` is dropped.
    """

    def __init__(self, starts_in_reasoning: bool = False, start_tag: str = "<think>", end_tag: str = "</think>"):
        self.start_tag, self.end_tag = start_tag, end_tag
        # "opening": may still see the start tag; "reasoning"; "content"
        self.state = "opening"
        self.in_reasoning = starts_in_reasoning
        self.buffer = ""
        self.skip_space = False  # drop whitespace until the next non-space character

    def feed(self, delta_text: str) -> ParsedDelta:
        self.buffer += delta_text
        return self._drain(final=False)

    @property
    def phase(self) -> str:
        if self.state == "opening":  # an opening tag may still come: reasoning either way if the prompt opened it
            return REASONING if self.in_reasoning else UNDECIDED
        return REASONING if self.state == "reasoning" else ANSWER

    def finish(self) -> ParsedDelta:
        return self._drain(final=True)

    def _emit(self, out: ParsedDelta, text: str) -> None:
        if self.skip_space:
            stripped = text.lstrip()
            if not stripped:
                return
            self.skip_space, text = False, stripped
        if self.state == "reasoning":
            out.reasoning += text
        else:
            out.content += text

    def _drain(self, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        while True:
            if self.state == "opening":
                head = self.buffer.lstrip()
                if head.startswith(self.start_tag):
                    self.buffer = head[len(self.start_tag) :]
                    self.state, self.skip_space = "reasoning", True
                    continue
                if not final and self.start_tag.startswith(head):  # empty, or part of the tag so far
                    return out
                self.state = "reasoning" if self.in_reasoning else "content"
                self.skip_space = self.in_reasoning
                continue
            if self.state == "reasoning":
                idx = self.buffer.find(self.end_tag)
                if idx >= 0:
                    self._emit(out, self.buffer[:idx])
                    self.buffer = self.buffer[idx + len(self.end_tag) :]
                    self.state, self.skip_space = "content", True
                    continue
                keep = 0 if final else held_prefix(self.buffer, self.end_tag)
                self._emit(out, self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return out
            self._emit(out, self.buffer)
            self.buffer = ""
            return out


def _harmony_parser(**_):
    from hearth.chat.harmony import HarmonyParser  # harmony parses reasoning and tool calls in one pass

    return HarmonyParser()


PARSERS: dict[str, Any] = {"think": ThinkParser, "harmony": _harmony_parser}
