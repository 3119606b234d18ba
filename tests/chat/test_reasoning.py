"""ThinkParser: reasoning / content split for `<think>…</think>`, whole text and random chunkings alike."""

from __future__ import annotations

import random

import pytest

from hearth.chat.reasoning import PARSERS, ParsedDelta, ReasoningParser, ThinkParser


def run(parser: ReasoningParser, chunks: list[str]) -> tuple[str, str]:
    out = ParsedDelta()
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    return out.reasoning, out.content


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


CASES = [
    # (starts_in_reasoning, output, reasoning, content)
    (True, "Let me think.\nOK.\n</think>\n\nThe answer is 4.", "Let me think.\nOK.\n", "The answer is 4."),
    (True, "<think>\nrepeated opening tag</think>answer", "repeated opening tag", "answer"),
    (True, "thinking until max_tokens, no end tag </thi", "thinking until max_tokens, no end tag </thi", ""),
    (True, "</think>straight to the answer", "", "straight to the answer"),
    (False, "<think>\nhmm</think>\n\nyes", "hmm", "yes"),
    (False, "  <think>x < y and a </b> tag</think>z", "x < y and a </b> tag", "z"),
    (False, "no thought at all, 2 < 3 <think>literal</think>", "", "no thought at all, 2 < 3 <think>literal</think>"),
    (False, "<thi", "", "<thi"),
    (False, "", "", ""),
    (True, "", "", ""),
    (True, "a</think>b</think>c", "a", "b</think>c"),
]


@pytest.mark.parametrize("starts_in_reasoning, text, reasoning, content", CASES)
def test_think_parser_whole_and_random_chunks(starts_in_reasoning, text, reasoning, content):
    assert run(ThinkParser(starts_in_reasoning), [text]) == (reasoning, content)
    assert run(ThinkParser(starts_in_reasoning), list(text)) == (reasoning, content)  # one character at a time
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(30):
        assert run(ThinkParser(starts_in_reasoning), random_chunks(text, rng)) == (reasoning, content)


def test_split_end_tag_is_held_back_then_released():
    parser = ThinkParser(starts_in_reasoning=True)
    assert parser.feed("step one </th").reasoning == "step one "
    delta = parser.feed("ink>done")
    assert (delta.reasoning, delta.content) == ("", "done")
    parser = ThinkParser(starts_in_reasoning=True)
    assert parser.feed("a </th").reasoning == "a "
    assert parser.feed("at was not a tag").reasoning == "</that was not a tag"


def test_streaming_emits_as_soon_as_possible():
    parser = ThinkParser(starts_in_reasoning=True)
    assert parser.feed("Hmm").reasoning == "Hmm"
    assert parser.feed(", well").reasoning == ", well"
    assert parser.feed("</think>").reasoning == ""
    assert parser.feed("Hi").content == "Hi"
    assert not parser.finish()


def test_registry():
    assert PARSERS["think"] is ThinkParser
    parser: ReasoningParser = PARSERS["think"](starts_in_reasoning=True)
    assert run(parser, ["x</think>y"]) == ("x", "y")
