"""api/structured.py's grammar_for across chat formats, decoded by a scripted model (tests/engine/test_structured.py)
and read back by each format's own output parser: forced and strict tool calls in harmony, Hermes (SmolLM2's
fallback) and DeepSeek V3 syntax; where the constraint starts for think and harmony formats; the engine fake sees
the grammar; unsupported schemas are 400s naming the keyword even without a model vocabulary.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from engine.test_structured import ANSWER, byte_tokenizer, scripted_decode
from test_api_fake import FakeEngine, chat, make_app

from hearth.api.protocol import ChatCompletionRequest, CompletionRequest
from hearth.api.structured import check_structured, grammar_for
from hearth.chat.format import ChatFormat
from hearth.chat.harmony import HarmonyParser
from hearth.chat.reasoning import ParsedDelta
from hearth.chat.tool_calls import ChainedParser, DeepSeekV3ToolParser, HermesToolParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def decode(tokenizer, fmt, body, script: str, prompt: str = "<|start|>assistant", fallback: str = "lowest"):
    """(output text without its final stop token, finish reason) of a scripted model under the request's grammar."""
    out = grammar_for(body, fmt, tokenizer)
    check_structured(tokenizer, out)
    stops = tuple(tokenizer.token_to_id(t) for t in ("<|call|>", "<|return|>"))
    ids, reason = scripted_decode(tokenizer, out.grammar, tokenizer.encode(script, add_special_tokens=False),
                                  tokenizer.encode(prompt, add_special_tokens=False), stops, fallback=fallback)  # fmt: skip
    if ids and ids[-1] in (*stops, *tokenizer.eos_token_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False), reason


def parse(parser, text: str) -> ParsedDelta:
    return parser.feed(text).extend(parser.finish())


HARMONY = ChatFormat(harmony=True, reasoning_parser="harmony")


@pytest.mark.parametrize(
    ("choice", "name"), [("required", "note"), ({"type": "function", "function": {"name": "get_weather"}}, "get_weather")]
)
def test_harmony_forced_call_after_free_analysis(tokenizer, choice, name):
    body = request(tools=[WEATHER, NOTE], tool_choice=choice)
    script = ("<|channel|>analysis<|message|>No tool needed, {I think}.<|end|><|start|>assistant"
              "<|channel|>final<|message|>It is sunny.<|return|>")  # fmt: skip
    # masked, the scripted model takes the highest allowed token: "commentary" over "analysis", "note" over "get_..."
    text, reason = decode(tokenizer, HARMONY, body, script, fallback="highest")
    assert reason == "stop"
    parsed = parse(HarmonyParser(), text)
    assert parsed.reasoning == "No tool needed, {I think}." and not parsed.content
    (call,) = parsed.tool_calls
    assert call.name == name
    tool = {"note": NOTE, "get_weather": WEATHER}[name]
    jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])


def test_harmony_strict_tool_under_auto_keeps_the_final_answer_free(tokenizer):
    body = request(tools=[WEATHER], tool_choice="auto")
    script = "<|channel|>analysis<|message|>easy<|end|><|start|>assistant<|channel|>final<|message|>Sunny!<|return|>"
    text, reason = decode(tokenizer, HARMONY, body, script)
    parsed = parse(HarmonyParser(), text)
    assert reason == "stop" and parsed.content == "Sunny!" and not parsed.tool_calls


def test_harmony_response_format_triggers_on_the_final_header(tokenizer):
    body = request(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    out = grammar_for(body, HARMONY, tokenizer)
    assert out.grammar.kind == "json_schema"
    assert out.grammar.trigger == tuple(tokenizer.encode("<|channel|>final<|message|>", add_special_tokens=False))


@pytest.mark.parametrize("think", [False, True])
def test_hermes_forced_call_for_a_template_without_tool_syntax(tokenizer, think):
    fmt = ChatFormat(reasoning_parser="think" if think else None, starts_in_reasoning=think)
    body = request(tools=[WEATHER], tool_choice="required")
    out = grammar_for(body, fmt, tokenizer)
    assert out.tool_parser == "hermes"
    assert out.grammar.trigger == ((tokenizer.token_to_id("</think>"),) if think else ())
    script = ("musing</think>" if think else "") + "I cannot call tools, sorry."
    text, reason = decode(tokenizer, fmt, body, script, prompt="<think>" if think else "user")
    parsed = parse(ChainedParser(None, HermesToolParser()), text.split("</think>")[-1])
    assert reason == "stop" and not parsed.content.strip()
    (call,) = parsed.tool_calls
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


def test_hermes_strict_tool_under_auto_allows_text_or_a_valid_call(tokenizer):
    fmt = ChatFormat(tool_parser="hermes")
    body = request(tools=[WEATHER], tool_choice="auto")
    text, reason = decode(tokenizer, fmt, body, "Just text, no call.", prompt="user")
    assert reason == "stop" and text == "Just text, no call."
    script = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France, Europe", "unit": "kelvin"}}'
    text, reason = decode(tokenizer, fmt, body, script, prompt="user")
    (call,) = parse(HermesToolParser(), text).tool_calls
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


def test_deepseek_forced_call(tokenizer):
    fmt = ChatFormat(reasoning_parser="think", tool_parser="deepseek_v3", starts_in_reasoning=True)
    body = request(tools=[WEATHER], tool_choice="required")
    text, reason = decode(tokenizer, fmt, body, "hmm</think>Paris is sunny.", prompt="<think>")
    assert reason == "stop"
    (call,) = parse(DeepSeekV3ToolParser(), text.split("</think>")[-1]).tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


def test_an_odd_x_guidance_key_in_a_tool_schema_is_not_a_500(tokenizer):
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x-guidance": "compact"}}}
    out = grammar_for(request(tools=[odd], tool_choice="required"), ChatFormat(), tokenizer)
    check_structured(tokenizer, out)
    assert out.grammar.kind == "lark" and out.tool_parser == "hermes"


def test_what_needs_no_grammar_gets_none(tokenizer):
    fmt = ChatFormat(tool_parser="hermes")
    assert grammar_for(request(), fmt, tokenizer).grammar is None
    assert grammar_for(request(response_format={"type": "text"}), fmt, tokenizer).grammar is None
    assert grammar_for(request(tools=[NOTE], tool_choice="auto"), fmt, tokenizer).grammar is None
    strict_but_none = request(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"})
    assert grammar_for(strict_but_none, fmt, tokenizer).grammar.kind == "json_schema"
    completion = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    assert grammar_for(completion, None, tokenizer).grammar.trigger == ()


def test_the_engine_gets_the_grammar_and_bad_schemas_are_400_without_a_vocabulary():
    from fastapi.testclient import TestClient

    engine = FakeEngine()
    with TestClient(make_app(engine)) as c:
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER, "strict": True}}
        assert chat(c, response_format=fmt).status_code == 200
        grammar = engine.calls[-1][1].grammar
        assert grammar.kind == "json_schema" and json.loads(grammar.source) == ANSWER and grammar.trigger == ()
        bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "if": {}}}}
        r = chat(c, response_format=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
        assert '"if"' in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "x", "response_format": bad})
        assert r.status_code == 400 and '"if"' in r.json()["error"]["message"]


@pytest.mark.parametrize("script", ["<think>hm, {not JSON}</think>\n\nSure: yes!", "Sure: yes!"])
def test_a_think_format_the_prompt_does_not_open_may_think_first_or_answer_at_once(tokenizer, script):
    from hearth.chat.reasoning import ThinkParser

    fmt = ChatFormat(reasoning_parser="think", starts_in_reasoning=False)
    body = request(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    assert grammar_for(body, fmt, tokenizer).grammar.trigger == ()  # the grammar itself holds the optional thought
    text, reason = decode(tokenizer, fmt, body, script, prompt="user")
    parsed = parse(ThinkParser(starts_in_reasoning=False), text)
    assert reason == "stop" and parsed.reasoning == ("hm, {not JSON}" if "<think>" in script else "")
    jsonschema.validate(json.loads(parsed.content), ANSWER)
    forced = request(tools=[WEATHER], tool_choice="required")
    text, reason = decode(tokenizer, fmt, forced, script, prompt="user")
    (call,) = parse(ChainedParser(ThinkParser(), HermesToolParser()), text).tool_calls
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
