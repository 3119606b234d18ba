"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) driven by the official `anthropic` client.

On the fake engine: shapes, the stream's event sequence, stop reasons, the translation onto the chat request, every bad
input (Anthropic's error shape, the server stays up), keys sent as x-api-key. On scripted model output: thinking blocks
and deltas from harmony and <think> in random chunkings, tool_use / tool_result round trips. At the end, end to end
against `hearth serve smollm2` under uvicorn (one server for the module).
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, TextBlock, ThinkingBlock, ToolUseBlock
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api_fake import REPLY, FakeEngine, FakeTokenizer, make_app
from test_api_reasoning import (
    GPT_OSS_CALL,
    GPT_OSS_FINAL,
    GPT_OSS_FINAL_TOKENS,
    HERMES_TEMPLATE,
    R1_TEMPLATE,
    R1_TOKENS,
    CharTokenizer,
    GroupedEngine,
    ScriptedEngine,
)
from test_api_server import serve_smollm2

from hearth.api.app import create_app
from hearth.api.errors import APIError
from hearth.api.messages import matched_stop, to_chat_request
from hearth.api.messages_protocol import MessagesRequest
from hearth.chat.template import ChatTemplate
from hearth.engine.protocol import EngineError, ModelInfo

HI = [{"role": "user", "content": "Hi"}]
WEATHER = {"name": "get_weather", "description": "Current weather",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}  # fmt: skip


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(make_app(engine, max_body_bytes=64 * 1024)) as c:
        yield c


def claude(test_client, api_key: str = "x") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url="http://testserver", api_key=api_key, http_client=test_client, max_retries=0)


def post(client, **body):
    return client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 64, "messages": HI, **body})


def anthropic_error(r, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


def sse(raw: bytes) -> list[dict]:
    """Anthropic's SSE strictly: `event: NAME` then `data: JSON` whose type is NAME, then a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :]
        events.append(event)
    return events


# --- shapes on the fake engine ----------------------------------------------------------------------------------------


def test_create_with_the_official_client(client, engine):
    # this client version sends the sampling fields through extra_body
    message = claude(client).messages.create(model="fake-model", max_tokens=64, messages=HI, system="Be brief.",
                                             metadata={"user_id": "u1"},
                                             extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5})  # fmt: skip
    assert isinstance(message, Message) and message.id.startswith("msg_") and message.role == "assistant"
    assert message.type == "message" and message.model == "fake-model"
    assert message.content == [TextBlock(type="text", text=REPLY)]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    prompt_ids, params, _ = engine.calls[0]
    prompt = FakeTokenizer().decode(prompt_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "<|im_start|>user\nHi<|im_end|>" in prompt
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.5, 0.9, 5, 64)
    # cached prompt tokens are counted apart, as Anthropic does
    usage = message.usage
    assert usage.cache_read_input_tokens == 2 and usage.input_tokens == len(prompt_ids) - 2
    assert usage.output_tokens == len(REPLY)


def test_count_tokens_is_the_prompt_that_runs(client, engine):
    c = claude(client)
    kwargs = {"model": "fake-model", "messages": HI, "system": [{"type": "text", "text": "Be brief."}],
              "tools": [WEATHER]}  # fmt: skip
    count = c.messages.count_tokens(**kwargs)
    message = c.messages.create(max_tokens=8, **kwargs)
    assert count.input_tokens == len(engine.calls[0][0])
    assert count.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert len(engine.calls) == 1  # counting runs nothing


def test_stop_reasons(client):
    c = claude(client)
    stopped = c.messages.create(model="fake-model", max_tokens=64, messages=HI, stop_sequences=["zzz", "world", "is"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "world"
    assert stopped.content[0].text == "Hello "
    cut = c.messages.create(model="fake-model", max_tokens=5, messages=HI, stop_sequences=["zzz"])
    assert cut.stop_reason == "max_tokens" and cut.content[0].text == "Hello" and cut.usage.output_tokens == 5
    whole = c.messages.create(model="fake-model", max_tokens=64, messages=HI, stop_sequences=["zzz"])
    assert whole.stop_reason == "end_turn" and whole.stop_sequence is None


def test_matched_stop_is_the_first_to_occur():
    assert matched_stop("Hello world", ["world", "llo"]) == "llo"
    assert matched_stop("abc", ["x"]) is None
    assert matched_stop("abcd", ["bcd", "bc"]) == "bcd"  # same start: the longer one, which holds the other


def test_stream_event_sequence_raw(engine):
    app = make_app(engine)

    async def run() -> bytes:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "fake-model", "max_tokens": 3, "messages": HI, "stream": True}
            r = await c.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return r.content

    events = sse(asyncio.run(run()))
    assert [e["type"] for e in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                           "content_block_delta", "content_block_delta", "content_block_stop",
                                           "message_delta", "message_stop"]  # fmt: skip
    start = events[0]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 0 and start["usage"]["input_tokens"] > 0
    assert events[2] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [e["delta"] for e in events[3:6]] == [{"type": "text_delta", "text": ch} for ch in REPLY[:3]]
    assert events[7]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[7]["usage"]["output_tokens"] == 3


def test_stream_with_the_official_client_agrees_with_create(client):
    c = claude(client)
    kwargs = {"model": "fake-model", "max_tokens": 64, "messages": HI, "stop_sequences": ["!"]}
    whole = c.messages.create(**kwargs)
    with c.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == "Hello world"
    assert [(b.type, b.text) for b in final.content] == [("text", "Hello world")]
    assert final.stop_reason == whole.stop_reason == "stop_sequence" and final.stop_sequence == "!"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_mid_stream_engine_error_is_an_error_event(client, engine):
    engine.mid_stream_error = EngineError("internal error while generating", 500)
    events = sse(post(client, stream=True).content)
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "internal error while generating"}}
    anthropic_error(post(client), 500, "api_error")


# --- the translation onto the chat request ------------------------------------------------------------------------------


def chat_of(**body):
    return to_chat_request(MessagesRequest.model_validate({"model": "m", "max_tokens": 16, "messages": HI, **body}))


def test_tool_choice_maps_onto_the_chat_fields():
    tools = {"tools": [WEATHER]}
    assert chat_of(tool_choice={"type": "any"}, **tools).tool_choice == "required"
    assert chat_of(tool_choice={"type": "none"}, **tools).tool_choice == "none"
    assert chat_of(tool_choice={"type": "auto"}, **tools).tool_choice == "auto"
    named = chat_of(tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, **tools)
    assert named.tool_choice.function.name == "get_weather" and named.parallel_tool_calls is False
    (tool,) = named.tools
    assert tool.function.name == "get_weather" and tool.function.parameters == WEATHER["input_schema"]
    assert chat_of(**tools).tool_choice is None


def test_thinking_maps_onto_effort_and_template_switch():
    low = chat_of(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024})
    assert low.reasoning_effort == "low" and low.chat_template_kwargs == {"enable_thinking": True}
    high = chat_of(max_tokens=40000, thinking={"type": "enabled", "budget_tokens": 32000})
    assert high.reasoning_effort == "high"
    off = chat_of(thinking={"type": "disabled"})
    assert off.chat_template_kwargs == {"enable_thinking": False} and off.reasoning_effort == "low"
    adaptive = chat_of(thinking={"type": "adaptive"})
    assert adaptive.chat_template_kwargs == {"enable_thinking": True} and adaptive.reasoning_effort is None
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    shaped = chat_of(output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}})
    assert shaped.reasoning_effort == "high" and shaped.response_format.type == "json_schema"
    assert shaped.response_format.json_schema.json_schema == schema
    assert chat_of().reasoning_effort is None and chat_of().chat_template_kwargs is None


def test_blocks_become_chat_messages():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Call it.", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And tomorrow?"}]},
    ]  # fmt: skip
    chat = chat_of(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], messages=messages)
    dumped = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert dumped == [
        {"role": "system", "content": "A\nB"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Call it.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}]},
        {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip
    error = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "no such city", "is_error": True}]
    chat = chat_of(messages=[*messages[:2], {"role": "user", "content": error}])
    assert chat.messages[-1].content == "Error: no such city"


TOOL_USE = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]}
BAD_BODIES = [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": []}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}]}, "nope"),
    ({"messages": [*HI, TOOL_USE, {"role": "user", "content": "x"}]}, "no tool_result"),
    ({"messages": [*HI, TOOL_USE, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                                "content": [{"type": "image"}]}]}]},
     "must be text blocks"),
    ({"messages": [*HI, TOOL_USE, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                                "content": 5}]}]},
     "messages[2].content[0].content:"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"messages": [*HI, {"role": "assistant", "content": "Sure"}]}, "prefill"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
     "assistant messages"),
    ({"max_tokens": 10**9}, "context length"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop_sequences": "x"}, "stop_sequences"),
    ({"system": 3}, "system"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools[0].name"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tool_choice": {"type": "any"}}, "needs tools"),
    ({"tool_choice": {"type": "tool", "name": "other"}, "tools": [WEATHER]}, "other"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "less than max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "needle"), BAD_BODIES, ids=[n for _, n in BAD_BODIES])
def test_bad_inputs_are_400_in_anthropic_shape(client, engine, body, needle):
    body = {"model": "fake-model", "max_tokens": 64, "messages": HI, **body}
    r = client.post("/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert needle in anthropic_error(r, 400, "invalid_request_error")
    assert not engine.calls
    if "max_tokens" in body and body["max_tokens"] != 10**9:
        return
    count = client.post("/v1/messages/count_tokens", json={k: v for k, v in body.items() if k != "max_tokens"})
    if "context length" not in needle and "budget_tokens" not in needle and "temperature" not in needle:
        assert count.status_code == 400 and count.json()["type"] == "error"


def test_other_refusals_in_anthropic_shape_and_the_server_stays_up(client, engine):
    surrogate = b'{"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = client.post("/v1/messages", content=surrogate, headers={"content-type": "application/json"})
    assert "surrogate" in anthropic_error(r, 400, "invalid_request_error")
    anthropic_error(post(client, model="claude-opus"), 404, "not_found_error")
    anthropic_error(client.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"}), 400,
                    "invalid_request_error")  # fmt: skip
    anthropic_error(client.post("/v1/messages", content=b"[1]", headers={"content-type": "application/json"}), 400,
                    "invalid_request_error")  # fmt: skip
    anthropic_error(post(client, system="x" * 70_000), 413, "request_too_large")
    anthropic_error(client.get("/v1/messages"), 405, "invalid_request_error")
    anthropic_error(client.post("/v1/messages/nope", json={}), 404, "not_found_error")
    engine.error = EngineError("the queue is full", 429)
    anthropic_error(post(client), 429, "rate_limit_error")
    engine.error = None
    engine.state = "loading"
    anthropic_error(post(client), 503, "overloaded_error")
    engine.state = "ready"
    # the other routes keep OpenAI's shape
    r = client.post("/v1/chat/completions", json={"model": "claude-opus", "messages": HI})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert claude(client).messages.create(model="fake-model", max_tokens=64, messages=HI).content[0].text == REPLY


def test_the_client_raises_its_own_errors(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(client).messages.create(model="fake-model", max_tokens=64, messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude(client).messages.create(model="nope", max_tokens=64, messages=HI)


# --- keys: x-api-key, and the governance refusals in Anthropic's shape ------------------------------------------------


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    from hearth.governance import keys
    from hearth.governance.keys import KeyStore, create_key

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(keys, "SCRYPT_N", 2**10)
    key, _ = create_key("app", scope="chat", rpm=2)
    with TestClient(make_app(FakeEngine(), keys=KeyStore())) as c:
        yield c, key


def test_x_api_key_works_and_refusals_are_in_anthropic_shape(keyed, caplog):
    client, key = keyed
    caplog.set_level("DEBUG")
    assert claude(client, api_key=key).messages.create(model="fake-model", max_tokens=8, messages=HI).content
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(client, api_key="hk_00000000_wrong").messages.count_tokens(model="fake-model", messages=HI)
    assert e.value.body["error"]["type"] == "authentication_error"
    anthropic_error(client.post("/v1/messages", json={}), 401, "authentication_error")
    r = client.post("/v1/chat/completions", json={"messages": HI})  # the OpenAI route: OpenAI's shape
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/v1/messages/count_tokens", json={"model": "fake-model", "messages": HI},
                     headers={"x-api-key": key})  # fmt: skip
    assert ok.status_code == 200  # the key's second request this minute, its last
    message = anthropic_error(client.post("/v1/messages", json={}, headers={"x-api-key": key}), 429, "rate_limit_error")
    assert "2 requests per minute" in message
    secret = key.split("_", 2)[2]
    assert "prompt tokens" in caplog.text  # the request was logged, and the keys were not:
    assert secret not in caplog.text and "wrong" not in caplog.text


# --- scripted reasoning and tools ---------------------------------------------------------------------------------------


def scripted(architecture: str, scripts: list, template: str | None = None):
    engine = ScriptedEngine(architecture, scripts)
    test_client = TestClient(create_app(engine, CharTokenizer(), template and ChatTemplate(template), "m"))
    return engine, test_client


def test_harmony_thinking_and_tool_use_round_trip():
    engine, test_client = scripted("GptOssForCausalLM", [GPT_OSS_CALL, GPT_OSS_FINAL])
    with test_client:
        c = claude(test_client)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        first = c.messages.create(model="m", max_tokens=2000, messages=messages, tools=[WEATHER],
                                  thinking={"type": "enabled", "budget_tokens": 1024})  # fmt: skip
        assert first.stop_reason == "tool_use"
        thinking, call = first.content
        assert isinstance(thinking, ThinkingBlock) and thinking.thinking == "User wants the weather. Call the tool."
        assert thinking.signature
        assert isinstance(call, ToolUseBlock) and call.name == "get_weather" and call.input == {"location": "Paris"}
        assert call.id.startswith("toolu_")
        assert "Reasoning: low" in CharTokenizer().decode(engine.calls[0][0])
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": '{"sky": "sunny"}'}]}]  # fmt: skip
        second = c.messages.create(model="m", max_tokens=2000, messages=messages, tools=[WEATHER])
        assert second.stop_reason == "end_turn"
        assert [type(b) for b in second.content] == [ThinkingBlock, TextBlock]
        assert second.content[1].text == "It is sunny in Paris."
        prompt = CharTokenizer().decode(engine.calls[1][0])
        assert '{"sky": "sunny"}' in prompt and "to=functions.get_weather" in prompt
        assert "User wants the weather." in prompt  # the ongoing tool loop keeps its analysis


@pytest.mark.parametrize("thinking", [{"type": "disabled"}, {"type": "enabled", "budget_tokens": 1024,
                                                             "display": "omitted"}])  # fmt: skip
def test_thinking_disabled_or_omitted_hides_the_thought(thinking):
    engine, test_client = scripted("GptOssForCausalLM", [GPT_OSS_FINAL])
    with test_client:
        message = claude(test_client).messages.create(model="m", max_tokens=2000, messages=HI, thinking=thinking)
    assert message.content == [TextBlock(type="text", text="It is sunny in Paris.")]


def test_non_reasoning_model_just_answers_with_thinking_enabled():
    with TestClient(make_app(FakeEngine(max_model_len=4096))) as client:
        message = claude(client).messages.create(model="fake-model", max_tokens=2000, messages=HI,
                                                 thinking={"type": "enabled", "budget_tokens": 1024})  # fmt: skip
    assert message.content == [TextBlock(type="text", text=REPLY)]


HERMES_TWO_CALLS = ('Let me check.<tool_call>{"name": "get_weather", "arguments": {"location": "Oslo"}}</tool_call>\n'
                    '<tool_call>{"name": "get_weather", "arguments": {"location": "Bergen"}}</tool_call>')  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_hermes_tool_use_and_disable_parallel(stream):
    engine, test_client = scripted("Qwen2ForCausalLM", [HERMES_TWO_CALLS, HERMES_TWO_CALLS], HERMES_TEMPLATE)
    with test_client:
        c = claude(test_client)
        kwargs = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Weather?"}],
                  "tools": [WEATHER]}  # fmt: skip
        for choice, cities in (({"type": "auto"}, ["Oslo", "Bergen"]),
                               ({"type": "any", "disable_parallel_tool_use": True}, ["Oslo"])):  # fmt: skip
            if stream:
                with c.messages.stream(tool_choice=choice, **kwargs) as s:
                    message = s.get_final_message()
            else:
                message = c.messages.create(tool_choice=choice, **kwargs)
            assert message.stop_reason == "tool_use"
            assert message.content[0].type == "text" and message.content[0].text == "Let me check."
            assert [b.input["location"] for b in message.content[1:]] == cities
            assert all(b.type == "tool_use" for b in message.content[1:])


def blocks_of(events: list[dict]) -> list[dict]:
    """Rebuild the content blocks from stream events, checking their order."""
    blocks, open_index = [], None
    for e in events:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == len(blocks)
            blocks.append(dict(e["content_block"]))
            open_index = e["index"]
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
            delta, block = e["delta"], blocks[open_index]
            if delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                block["input"] = json.loads(delta["partial_json"])
            else:
                kind = delta["type"].removesuffix("_delta")
                assert block["type"] == kind
                block[kind] += delta[kind]
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
    assert open_index is None
    return blocks


@settings(max_examples=40, deadline=None)
@given(script=st.sampled_from(["r1", "harmony"]), cuts=st.lists(st.integers(1, 19), max_size=10))
def test_thinking_splits_the_same_in_any_chunking(script, cuts):
    """Tokens grouped into random deltas: the streamed thinking and text deltas rebuild the blocks of the whole
    response, which hold the thought and the answer exactly."""
    tokens = R1_TOKENS if script == "r1" else GPT_OSS_FINAL_TOKENS
    bounds = sorted({c for c in cuts if c < len(tokens)})
    pieces = ["".join(tokens[a:b]) for a, b in zip([0, *bounds], [*bounds, len(tokens)])]
    sizes = [b - a for a, b in zip([0, *bounds], [*bounds, len(tokens)])]
    results = []
    for stream in (False, True):
        engine = GroupedEngine(pieces, sizes)
        engine.model_info = ModelInfo("scripted", 4096, "Qwen2ForCausalLM" if script == "r1" else "GptOssForCausalLM")
        app = create_app(engine, CharTokenizer(), ChatTemplate(R1_TEMPLATE) if script == "r1" else None, "m")
        with TestClient(app) as c:
            r = c.post("/v1/messages", json={"model": "m", "max_tokens": 64, "messages": HI, "stream": stream})
        results.append(blocks_of(sse(r.content)) if stream else r.json()["content"])
    expected = {"r1": ("Two plus two is four.", "The answer is 4."),
                "harmony": ("The tool says sunny.", "It is sunny in Paris.")}[script]  # fmt: skip
    whole, streamed = results
    assert whole == streamed
    assert [b["type"] for b in whole] == ["thinking", "text"]
    assert (whole[0]["thinking"].strip(), whole[1]["text"]) == expected and whole[0]["signature"]


def test_garbled_harmony_output_is_still_an_answer():
    garbled = ["<|channel|>fnal<|message|>Paris.", "no markup at all", "final<|message|>Header without channel."]
    engine, test_client = scripted("GptOssForCausalLM", list(garbled))
    with test_client:
        texts = [claude(test_client).messages.create(model="m", max_tokens=64, messages=HI).content for _ in garbled]
    assert [t[-1].text for t in texts] == ["Paris.", "no markup at all", "Header without channel."]


def test_to_chat_request_wraps_a_rule_the_chat_request_adds():
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 16, "messages": HI})
    body.temperature = 5.0  # past what the Messages model allows: the chat request refuses it as a 400, never a 500
    with pytest.raises(APIError) as e:
        to_chat_request(body)
    assert e.value.status == 400 and e.value.param == "temperature"


# --- end to end: hearth serve smollm2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    with serve_smollm2() as url:
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_served_create_stream_and_count_agree(served):
    kwargs = {"model": "smollm2", "max_tokens": 12, "messages": QUESTION, "extra_body": {"temperature": 0}}
    message = served.messages.create(**kwargs)
    (block,) = message.content
    assert isinstance(block, TextBlock) and block.text and message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 12
    count = served.messages.count_tokens(model="smollm2", messages=QUESTION)
    assert count.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens > 5
    with served.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == block.text and final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens


@pytest.mark.slow
def test_served_tool_result_round_trip_and_bad_input(served):
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"location": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": "Sunny, 21 C"}]}]  # fmt: skip
    message = served.messages.create(model="smollm2", max_tokens=8, messages=messages, tools=[WEATHER],
                                     extra_body={"temperature": 0})  # fmt: skip
    assert message.content and message.usage.input_tokens + message.usage.cache_read_input_tokens > 20
    with pytest.raises(anthropic.BadRequestError):
        served.messages.create(model="smollm2", max_tokens=10**6, messages=QUESTION)
    assert served.messages.create(model="smollm2", max_tokens=2, messages=QUESTION).usage.output_tokens <= 2


def test_official_client_stream_builds_thinking_and_tool_use():
    """The client's own accumulation of the events: thinking and signature deltas, input_json_delta."""
    engine, test_client = scripted("GptOssForCausalLM", [GPT_OSS_CALL])
    kwargs = {"model": "m", "max_tokens": 64, "messages": HI, "tools": [WEATHER]}
    with test_client, claude(test_client).messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds and "input_json" in kinds
    thinking, call = message.content
    assert thinking.type == "thinking" and thinking.thinking == "User wants the weather. Call the tool."
    assert len(thinking.signature) == 64
    assert call.type == "tool_use" and call.input == {"location": "Paris"} and message.stop_reason == "tool_use"
