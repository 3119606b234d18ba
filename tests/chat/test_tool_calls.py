"""Tool-call parsers (DeepSeek-V3, Hermes/Qwen): whole text and random chunkings give the same calls and content;
malformed or unterminated calls come back as content."""

from __future__ import annotations

import json
import random

import pytest
from test_reasoning import random_chunks

from hearth.chat.reasoning import ParsedDelta, ThinkParser
from hearth.chat.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    TOOL_PARSERS,
    TOOL_SEP,
    ChainedParser,
    DeepSeekV3ToolParser,
    HermesToolParser,
)


def run(parser, chunks: list[str]) -> tuple[str, str, list[tuple[str, dict]]]:
    out = ParsedDelta()
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    return out.reasoning, out.content, [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def check_all_chunkings(make_parser, text: str, expected) -> None:
    assert run(make_parser(), [text]) == expected
    assert run(make_parser(), list(text)) == expected
    rng = random.Random(len(text))
    for _ in range(40):
        assert run(make_parser(), random_chunks(text, rng)) == expected


def ds_call(name: str, args: dict) -> str:
    return f"{CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{CALL_END}"


WEATHER = {"city": "Zürich", "unit": "celsius"}
TIME = {"tz": "Europe/Paris"}

DEEPSEEK_CASES = [
    (f"Let me check.{CALLS_BEGIN}{ds_call('get_weather', WEATHER)}\n{ds_call('get_time', TIME)}{CALLS_END}",
     "Let me check.", [("get_weather", WEATHER), ("get_time", TIME)]),
    (f"{CALLS_BEGIN}{CALL_BEGIN}get_time{TOOL_SEP}{json.dumps(TIME)}{CALL_END}{CALLS_END}",  # V3.1 form
     "", [("get_time", TIME)]),
    ("plain answer with no calls, even <｜tool", "plain answer with no calls, even <｜tool", []),
    # malformed JSON degrades to content; the good call before it is kept
    (f"{CALLS_BEGIN}{ds_call('a', {'x': 1})}{CALL_BEGIN}function{TOOL_SEP}b\n```json\n{{oops\n```{CALL_END}{CALLS_END}",
     f"{CALL_BEGIN}function{TOOL_SEP}b\n```json\n{{oops\n```{CALL_END}{CALLS_END}", [("a", {"x": 1})]),
    # unterminated at max_tokens: the raw text is content
    (f"ok {CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\":",
     f"ok {CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\":", []),
]  # fmt: skip


@pytest.mark.parametrize("text, content, calls", DEEPSEEK_CASES)
def test_deepseek_v3_tool_calls(text, content, calls):
    check_all_chunkings(DeepSeekV3ToolParser, text, ("", content, calls))


HERMES_CASES = [
    ('I will call it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Paris\\"}"}\n</tool_call>',
     "I will call it.\n\n", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("a < b, and <tool_ is not a tag", "a < b, and <tool_ is not a tag", []),
    ('<tool_call>{"name": 3}</tool_call> after', '<tool_call>{"name": 3}</tool_call> after', []),
    ('<tool_call>{"name": "f", "arguments": {}', '<tool_call>{"name": "f", "arguments": {}', []),
]  # fmt: skip


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_tool_calls(text, content, calls):
    check_all_chunkings(HermesToolParser, text, ("", content, calls))


def test_calls_are_emitted_when_complete():
    parser = DeepSeekV3ToolParser()
    text = f"Sure.{CALLS_BEGIN}{ds_call('get_time', TIME)}"
    delta = parser.feed(text[:-3])
    assert delta.content == "Sure." and delta.tool_calls == []
    delta = parser.feed(text[-3:])
    assert [c.name for c in delta.tool_calls] == ["get_time"] and delta.tool_calls[0].id.startswith("call_")
    assert not parser.finish()


def test_r1_output_through_reasoning_then_tools():
    text = f"I need the weather.</think>\n\n{CALLS_BEGIN}{ds_call('get_weather', WEATHER)}{CALLS_END}"
    make = lambda: ChainedParser(ThinkParser(starts_in_reasoning=True), DeepSeekV3ToolParser())  # noqa: E731
    check_all_chunkings(make, text, ("I need the weather.", "", [("get_weather", WEATHER)]))


def test_registry():
    assert {"deepseek_v3": DeepSeekV3ToolParser, "hermes": HermesToolParser} == TOOL_PARSERS
