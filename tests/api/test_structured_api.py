"""Structured output end to end on the embedded SmolLM2 behind `hearth serve`'s app (the served-model fixture of
test_api_server.py): response_format on chat and completions, `parse` with a pydantic model, strict and forced tool
calls, finish reasons, and 400s for schemas the grammar engine does not support. Requests go out concurrently so the
engine batches them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pydantic
import pytest
from test_api_server import MODEL, server  # noqa: F401  (the served model, one per module)
from test_api_server import client as client  # noqa: F401

pytestmark = pytest.mark.slow

# at temperature 1 a small model may go on forever where the schema lets it (a number's digits, extra keys): strings,
# numbers and objects are bounded, as a strict schema would bound them
S = {"type": "string", "maxLength": 24}
INT = {"type": "integer", "minimum": -1000, "maximum": 1000}
NUM = {"type": "number", "minimum": -100, "maximum": 100}


def closed(schema):
    """`schema` with additionalProperties false on every object that lists properties and says nothing of others."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


SCHEMAS: list[dict] = closed([
    {"type": "object", "properties": {"name": S, "age": INT}, "required": ["name", "age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": S, "address": {"type": "object", "properties": {"city": S, "zip": {"type": "string",
                                                                                  "pattern": "^[0-9]{5}$"}},
                               "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}}, "required": ["person"]},
    {"type": "object", "properties": {"numbers": {"type": "array", "items": INT, "minItems": 2,
                                                  "maxItems": 4}}, "required": ["numbers"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"value": {"anyOf": [INT, {"type": "string", "maxLength": 10}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"],
     "additionalProperties": False},
    {"type": "object", "properties": {"rank": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
     "required": ["rank"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}}, "required": ["ok", "note"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": S, "b": INT, "c": {"type": "boolean"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": INT, "tags": {
            "type": "array", "maxItems": 2, "items": {"enum": ["new", "old", "hot"]}}},
        "required": ["id", "tags"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"version": {"const": "1.0"}, "title": S}, "required": ["version", "title"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "maxItems": 3, "items": INT}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"x": {"type": ["integer", "null"]}}, "required": ["x"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": NUM, "y": NUM},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"type": "object", "properties": {"result": {"oneOf": [INT, {"type": "boolean"}]}},
     "required": ["result"]},
    {"type": "array", "items": S, "minItems": 1, "maxItems": 3},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 6}}, "required": ["word"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}, "at": {"type": "string",
                                                                                         "format": "date-time"}},
     "required": ["id", "at"], "additionalProperties": False},
    {"type": "object", "additionalProperties": INT, "maxProperties": 3},
    {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "object", "properties": {"d": INT}, "required": ["d"]}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
     "required": ["n"]},
    {"type": "array", "prefixItems": [S, INT], "items": False, "minItems": 2},
])  # fmt: skip
MAX_TOKENS = 120


def ask(oai, messages, **kwargs):
    return oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, **kwargs)


def valid(schema: dict, text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return validator.is_valid(value)


def test_every_schema_at_temperature_0_and_1(client):  # noqa: F811
    assert len(SCHEMAS) >= 25
    jobs = [(i, schema, temperature) for i, schema in enumerate(SCHEMAS) for temperature in (0.0, 1.0)]

    def run(job):
        i, schema, temperature = job
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        prompt = f"Reply with JSON for this schema: {json.dumps(schema)}"
        out = ask(client, [{"role": "user", "content": prompt}], temperature=temperature, seed=i,
                  response_format=fmt).choices[0]  # fmt: skip
        if temperature and out.finish_reason == "length":
            # a sample may keep extending what the grammar leaves unbounded (a date-time's fraction of a second: on
            # an AVX2 CPU seed 21 wrote 100 digits of it); the next seed must then stop with valid JSON
            out = ask(client, [{"role": "user", "content": prompt}], temperature=temperature, seed=i + 1000,
                      response_format=fmt).choices[0]  # fmt: skip
        return job, out.message.content, out.finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    bad = [(i, temperature, text, reason) for (i, schema, temperature), text, reason in results
           if reason != "stop" or not valid(schema, text)]  # fmt: skip
    assert not bad, bad


def test_json_object_and_completions(client):  # noqa: F811
    question = 'Reply with a JSON object like {"answer": "..."}: what is the capital of France?'
    out = ask(client, [{"role": "user", "content": question}], temperature=0,
              response_format={"type": "json_object"}).choices[0]  # fmt: skip
    assert out.finish_reason == "stop" and isinstance(json.loads(out.message.content), dict)
    schema = SCHEMAS[0]
    done = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=1,
                                     n=3, seed=5, extra_body={"response_format": {
                                         "type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})  # fmt: skip
    assert [c.finish_reason for c in done.choices] == ["stop"] * 3
    assert all(valid(schema, c.text) for c in done.choices)


def test_streamed_constrained_output_is_the_same_json(client):  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[12]}}
    kwargs = {"temperature": 0, "response_format": fmt}
    messages = [{"role": "user", "content": "Some tagged items as JSON."}]
    whole = ask(client, messages, **kwargs).choices[0]
    chunks = [c for c in ask(client, messages, stream=True, **kwargs) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop" and valid(SCHEMAS[12], whole.message.content)


class Step(pydantic.BaseModel):
    explanation: str = pydantic.Field(max_length=40)
    output: int


class Solution(pydantic.BaseModel):
    steps: list[Step] = pydantic.Field(max_length=2)
    final_answer: int


def test_parse_with_a_pydantic_model(client):  # noqa: F811
    out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Solve 2 + 3 step by step."}],
                                        response_format=Solution, temperature=0, max_tokens=150)  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(out.choices[0].message.parsed, Solution)


WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
    "additionalProperties": False}}}  # fmt: skip
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def test_strict_tools_with_tool_choice_required_always_call(client):  # noqa: F811
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    outs = [
        ask(client, question, tools=[WEATHER, TIME], tool_choice="required", temperature=1, n=6, seed=3),
        ask(client, question, tools=[WEATHER, TIME], tool_choice="required", temperature=0),
    ]
    choices = [c for out in outs for c in out.choices]
    assert len(choices) == 7
    for choice in choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert valid(TOOL_SCHEMAS[call.function.name], call.function.arguments), call


def test_named_tool_choice_calls_that_tool(client):  # noqa: F811
    named = {"type": "function", "function": {"name": "get_time"}}
    out = ask(client, [{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER, TIME],
              tool_choice=named, temperature=1, n=3, seed=1)  # fmt: skip
    for choice in out.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and valid(TIME["function"]["parameters"], call.function.arguments)


def test_max_tokens_before_the_grammar_completes_is_length(client):  # noqa: F811
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[1]}}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                         max_tokens=4, temperature=0, response_format=fmt).choices[0]  # fmt: skip
    assert out.finish_reason == "length" and not valid(SCHEMAS[1], out.message.content)


@pytest.mark.parametrize(("body", "param", "keyword"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "u", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema",
     "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
     "response_format.json_schema.schema", "not"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "look-around"),
])  # fmt: skip
def test_unsupported_schemas_are_400_naming_the_keyword(server, body, param, keyword):  # noqa: F811
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], **body}, timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and keyword in error["message"] and error["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", **body}, timeout=60)
    if "response_format" in body:
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_responses_text_format_and_required_tools_hold(client):  # noqa: F811
    """/v1/responses goes through the chat path's grammar: `text.format` and `tool_choice` hold there too."""
    schema = SCHEMAS[2]
    fmt = {"type": "json_schema", "name": "numbers", "schema": schema, "strict": True}
    for seed in (1, 2):
        out = client.responses.create(model=MODEL, input="Some numbers as JSON.", text={"format": fmt}, temperature=1,
                                      max_output_tokens=MAX_TOKENS, store=False, extra_body={"seed": seed})  # fmt: skip
        assert out.status == "completed" and valid(schema, out.output_text), out.output_text
    tool = {"type": "function", **WEATHER["function"]}
    out = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                  tool_choice="required", temperature=1, store=False)  # fmt: skip
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "get_weather" and valid(TOOL_SCHEMAS["get_weather"], call.arguments)


def test_messages_tool_choice_any_and_a_named_tool_hold(server):  # noqa: F811
    """/v1/messages maps `tool_choice` any / tool onto the chat path's forced calls: a valid tool_use every time."""
    anthropic = pytest.importorskip("anthropic")
    messages = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120).messages
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
    ask_weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice, names in (({"type": "any"}, set(TOOL_SCHEMAS)), ({"type": "tool", "name": "get_time"}, {"get_time"})):
        out = messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=ask_weather, tools=tools, tool_choice=choice,
                              extra_body={"temperature": 1})  # fmt: skip
        uses = [block for block in out.content if block.type == "tool_use"]
        assert out.stop_reason == "tool_use" and uses, out
        for use in uses:
            assert use.name in names and jsonschema.Draft202012Validator(TOOL_SCHEMAS[use.name]).is_valid(use.input)
