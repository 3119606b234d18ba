"""Harmony rendering against openai-harmony (run offline on the o200k vocabulary shipped in quicktok-v1), and the
streaming parser under random chunkings and malformed output."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.chat.harmony import HarmonyParser, ParsedDelta, ToolCall, parse, render, render_ids

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the current weather in the provided location.",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": ["string", "null"]},
        "nested": {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]},
        "either": {"oneOf": [{"type": "string"}, {"type": "number"}]},
    }},
}}  # fmt: skip
LOCATION = {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user."}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the docs.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "default": 5}},
    "required": ["query"]}}}  # fmt: skip

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"SF"}'}}
CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 2?"}], {}),
    ([{"role": "user", "content": "Hi"}], {"reasoning_effort": "low"}),
    ([{"role": "user", "content": "Hi"}], {"reasoning_effort": "high", "current_date": "2025-08-05"}),
    ([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}], {}),
    ([{"role": "developer", "content": "Be terse.\nNo lists."}, {"role": "user", "content": "Why?"}], {}),
    ([{"role": "user", "content": "Weather?"}], {"tools": [WEATHER]}),
    ([{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Where am I?"}],
     {"tools": [LOCATION, WEATHER, SEARCH]}),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Easy.", "content": "4"},
      {"role": "user", "content": "and 3+3?"}], {}),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "one"},
      {"role": "user", "content": "b"}, {"role": "assistant", "reasoning_content": "r2", "content": "two"},
      {"role": "user", "content": "c"}], {"reasoning_effort": "high"}),
    ([{"role": "user", "content": "Weather in SF?"},
      {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL]}], {"tools": [WEATHER]}),
    ([{"role": "user", "content": "Weather in SF?"},
      {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"sunny": true, "temp": 20}'}], {"tools": [WEATHER]}),
    ([{"role": "user", "content": "Weather in SF?"},
      {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"sunny": true}'},
      {"role": "assistant", "reasoning_content": "It is sunny.", "content": "Sunny in SF."},
      {"role": "user", "content": "Thanks! Tomorrow?"}], {"tools": [WEATHER], "current_date": "2025-01-02"}),
    ([{"role": "user", "content": "ünïcødé ✓ 日本語"}, {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "again"}], {"reasoning_effort": "low"}),
    # a finished turn, then a tool loop under way: the finished turn's analysis goes, the loop's stays
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "reasoning_content": "Greet.", "content": "Hello!"},
      {"role": "user", "content": "Weather in SF?"},
      {"role": "assistant", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": '{"sunny": true}'},
      {"role": "assistant", "reasoning_content": "Check again.", "tool_calls": [{**CALL, "id": "c2"}]},
      {"role": "tool", "tool_call_id": "c2", "content": '{"sunny": false}'}], {"tools": [WEATHER]}),
]  # fmt: skip


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory):
    """openai-harmony's encoding, offline: o200k_base.tiktoken rebuilt from quicktok-v1's o200k.vocab."""
    openai_harmony = pytest.importorskip("openai_harmony")
    spec = importlib.util.find_spec("quicktok")
    if spec is None:
        pytest.skip("quicktok-v1 is not installed")
    with open(os.path.join(os.path.dirname(spec.origin), "data", "o200k.vocab"), "rb") as f:
        data = f.read()
    (count,) = struct.unpack_from("<I", data, 0)
    pos, lines = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", data, pos + 2 + length)
        pos += 6 + length
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    folder = tmp_path_factory.mktemp("tiktoken")
    (folder / "o200k_base.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = old


def to_harmony(messages, options):
    """The same conversation built with openai-harmony's own types, as harmony's rules say to send it: without the
    analysis of turns that ended in a final answer (the library drops only what comes before the first final, and
    only when the conversation ends in one)."""
    import openai_harmony as h

    finals = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("content")]
    messages = [{k: v for k, v in m.items() if k != "reasoning_content" or i > finals[-1]} for i, m in
                enumerate(messages)] if finals else messages  # fmt: skip
    system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort(options.get("reasoning_effort", "medium").title()))
    if options.get("current_date"):
        system = system.with_conversation_start_date(options["current_date"])
    out = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
    instructions = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    tools = [h.ToolDescription.new(t["function"]["name"], t["function"]["description"],
                                   parameters=t["function"].get("parameters")) for t in options.get("tools", [])]  # fmt: skip
    if instructions or tools:
        dev = h.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(tools)
        out.append(h.Message.from_role_and_content(h.Role.DEVELOPER, dev))
    names = {}
    for m in messages:
        if m["role"] == "user":
            out.append(h.Message.from_role_and_content(h.Role.USER, m["content"]))
        elif m["role"] == "assistant":
            if m.get("reasoning_content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, m["reasoning_content"]).with_channel("analysis"))
            for call in m.get("tool_calls", []):
                names[call["id"]] = call["function"]["name"]
                msg = h.Message.from_role_and_content(h.Role.ASSISTANT, call["function"]["arguments"])
                out.append(msg.with_channel("commentary").with_recipient(f"functions.{call['function']['name']}")
                           .with_content_type("<|constrain|>json"))  # fmt: skip
            if m.get("content"):
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, m["content"]).with_channel("final"))
        elif m["role"] == "tool":
            author = h.Author.new(h.Role.TOOL, f"functions.{names[m['tool_call_id']]}")
            msg = h.Message.from_author_and_content(author, m["content"])
            out.append(msg.with_recipient("assistant").with_channel("commentary"))
    return h.Conversation.from_messages(out)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_rendered_ids_match_openai_harmony(case, harmony_encoding):
    import openai_harmony as h

    messages, options = CONVERSATIONS[case]
    theirs = harmony_encoding.render_conversation_for_completion(to_harmony(messages, options), h.Role.ASSISTANT)
    ours = render_ids(messages, lambda text: harmony_encoding.encode(text, allowed_special=set()), **options)
    assert ours == list(theirs), (harmony_encoding.decode(ours), harmony_encoding.decode(theirs))


def test_render_golden_simple_convo():
    """harmony test-data/test_simple_convo.txt (docs/models.md §1.8)."""
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
        "2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for "
        "every message.<|end|><|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    )
    assert render([{"role": "user", "content": "What is 2 + 2?"}]) == expected


def test_drop_reasoning_modes():
    messages = CONVERSATIONS[8][0]
    assert "r1" not in render(messages) and "r2" not in render(messages)  # both turns ended with an answer
    assert "r1" not in render(messages, drop_reasoning="turns") and "r2" not in render(messages, drop_reasoning="turns")
    assert "r1" in render(messages, drop_reasoning="none")
    loop = CONVERSATIONS[-1][0]  # an answered turn, then two rounds of a tool loop
    text = render(loop, tools=[WEATHER])
    assert "Greet." not in text and "Need the tool." in text and "Check again." in text
    assert text.index("Need the tool.") < text.index('{"sunny": true}') < text.index("Check again.")
    answered = render([*loop, {"role": "assistant", "reasoning_content": "Done.", "content": "Sunny, then not."},
                       {"role": "user", "content": "Thanks"}], tools=[WEATHER])  # fmt: skip
    assert not any(r in answered for r in ("Greet.", "Need the tool.", "Check again.", "Done."))
    assert "Sunny, then not." in answered and '{"sunny": false}' in answered
    with pytest.raises(ValueError):
        render(messages, reasoning_effort="extreme")


OUTPUTS = {
    "answer": ("<|channel|>analysis<|message|>User asks 2+2. Simple: 4.<|end|><|start|>assistant<|channel|>final"
               "<|message|>2 + 2 = **4** ✓<|return|>",
               ParsedDelta("User asks 2+2. Simple: 4.", "2 + 2 = **4** ✓")),
    "tool": ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
             'to=functions.get_weather <|constrain|>json<|message|>{"location": "San Francisco, CA"}<|call|>',
             ParsedDelta("Need weather.", "", [ToolCall("get_weather", '{"location": "San Francisco, CA"}', id="call_0")])),
    "recipient_first": ("<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.lookup<|channel|>"
                        'commentary <|constrain|>json<|message|>{"q": "<|"}<|call|>ignored',
                        ParsedDelta("x", "", [ToolCall("lookup", '{"q": "<|"}', id="call_0")])),
    "preamble": ("<|channel|>commentary<|message|>Checking…<|end|><|start|>assistant<|channel|>final<|message|>Done"
                 "<|return|>", ParsedDelta("", "Checking…Done")),
    "no_return": ("<|channel|>analysis<|message|>a < b, <|x| not special<|end|><|start|>assistant<|channel|>final"
                  "<|message|>cut off", ParsedDelta("a < b, <|x| not special", "cut off")),
    "plain_text": ("Hello! No harmony here at all.", ParsedDelta("", "Hello! No harmony here at all.")),
    "garbled_header": ("<|channel|>fin<|end|>al answer<|start|>assistant<|channel|>final<|message|>ok<|return|>",
                       ParsedDelta("", "final answerok")),
    "long_garbage": ("x" * 400 + "<|message|>tail", ParsedDelta("", "x" * 400 + "tail")),
    # sampling at temperature 1 garbles headers: each still ends as content, reasoning or a call, never an error
    "unknown_channel": ("<|channel|>fnal<|message|>Paris.<|return|>", ParsedDelta("", "Paris.")),
    "no_message_final": ("<|channel|>final Paris.<|return|>", ParsedDelta("", "Paris.")),
    "no_message_analysis": ("<|channel|>analysis Hmm.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
                            ParsedDelta("Hmm.", "4")),
    "no_message_call": ('<|channel|>commentary to=functions.get_weather <|constrain|>json{"location": "Oslo"}<|call|>',
                        ParsedDelta("", "", [ToolCall("get_weather", '{"location": "Oslo"}', id="call_0")])),
    "no_channel": ("final<|message|>Header without channel.<|return|>", ParsedDelta("", "Header without channel.")),
    "recipient_no_channel": ('to=functions.lookup<|message|>{"q": 1}<|call|>',
                             ParsedDelta("", "", [ToolCall("lookup", '{"q": 1}', id="call_0")])),
    "stray_end": ("Paris.<|end|>", ParsedDelta("", "Paris.")),
    "unterminated_header": ("<|channel|>analysis Hmm", ParsedDelta("Hmm", "")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_parse_whole_and_random_chunkings(name):
    text, expected = OUTPUTS[name]
    assert parse(text) == expected
    rng = random.Random(name)
    for trial in range(60):
        parser, result, pos = HarmonyParser(), ParsedDelta(), 0
        while pos < len(text):
            size = rng.randint(1, 3 if trial % 2 else 12)
            result.extend(parser.feed(text[pos : pos + size]))
            pos += size
        result.extend(parser.finish())
        assert result == expected


def test_reasoning_streams_before_the_message_ends():
    parser = HarmonyParser()
    delta = parser.feed("<|channel|>analysis<|message|>thinking about it <|")
    assert delta.reasoning == "thinking about it " and not delta.content  # "<|" held back: may start a token
    assert parser.feed("end|>").reasoning == ""
    delta = parser.feed("<|start|>assistant<|channel|>final<|message|>Hi")
    assert delta.content == "Hi"
    assert parser.feed("<|return|>").content == "" and parser.finished


def test_tool_call_arguments_are_json():
    call = parse(OUTPUTS["tool"][0]).tool_calls[0]
    assert json.loads(call.arguments) == {"location": "San Francisco, CA"}


PIECES = ["<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>", "analysis",
          "final", "commentary", " to=functions.f", "json", "assistant", '{"a": 1}', "x", " ", "<|", "|>", "fnal"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=30), sizes=st.lists(st.integers(1, 8), min_size=1))
def test_any_garble_parses_the_same_whole_and_in_chunks(pieces, sizes):
    """Random sequences of harmony's tokens and words: parsing never raises, and every chunking gives the result of
    the whole text (call ids aside)."""
    text = "".join(pieces)
    whole = parse(text)
    parser, result, pos, k = HarmonyParser(), ParsedDelta(), 0, 0
    while pos < len(text):
        result.extend(parser.feed(text[pos : pos + sizes[k % len(sizes)]]))
        pos, k = pos + sizes[k % len(sizes)], k + 1
    result.extend(parser.finish())
    assert (result.reasoning, result.content) == (whole.reasoning, whole.content)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
