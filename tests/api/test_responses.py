"""POST /v1/responses, GET / DELETE /v1/responses/{id}: the official `openai` client against a fake engine (shapes,
events, the store, errors), a scripted gpt-oss or <think> model (reasoning items, tool calls, streamed in random
chunkings) and, marked slow, `hearth serve smollm2` under a real uvicorn.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_fake import REPLY, FakeEngine, FakeTokenizer, make_app
from test_api_reasoning import GPT_OSS_CALL, GPT_OSS_FINAL, R1_TEMPLATE, WEATHER_TOOL, CharTokenizer, ScriptedEngine

from hearth.api.app import create_app
from hearth.api.response_store import ResponseStore
from hearth.chat.template import ChatTemplate
from hearth.engine.protocol import Delta, EngineError

FUNCTION_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather",
                 "parameters": WEATHER_TOOL["function"]["parameters"], "strict": False}  # fmt: skip


@pytest.fixture
def store(tmp_path) -> ResponseStore:
    s = ResponseStore(str(tmp_path / "responses.db"))
    yield s
    s.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine, store):
    with TestClient(make_app(engine, responses_store=store)) as c:
        yield c


@pytest.fixture
def oai(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def decode(ids: list[int]) -> str:
    return FakeTokenizer().decode(ids)


def stream_events(oai: openai.OpenAI, **kwargs) -> tuple[list, object]:
    """Every event `client.responses.stream` yields, and the response its last event carries (completed or
    incomplete; the helper's get_final_response knows only completed ones)."""
    with oai.responses.stream(**kwargs) as stream:
        events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events, events[-1].response


# --- shapes on the fake engine --------------------------------------------------------------------------------------


def test_create_is_the_chat_path(oai, client, engine):
    """A string input renders exactly as the same chat message does; the response carries one message item."""
    out = oai.responses.create(model="fake-model", input="Hi", temperature=0.5, top_p=0.9, metadata={"k": "v"})
    assert out.id.startswith("resp_") and out.object == "response" and out.status == "completed"
    assert out.output_text == REPLY and out.model == "fake-model" and out.store is True
    (item,) = out.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert item.status == "completed" and item.content[0].type == "output_text" and item.content[0].annotations == []
    assert out.metadata == {"k": "v"} and out.temperature == 0.5 and out.top_p == 0.9 and out.incomplete_details is None
    prompt_ids, params, request_id = engine.calls[0]
    assert request_id == out.id + "-0" and (params.temperature, params.top_p) == (0.5, 0.9)
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and engine.calls[1][0] == prompt_ids
    u = out.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (len(prompt_ids), len(REPLY), len(prompt_ids) + len(REPLY))
    assert u.input_tokens_details.cached_tokens == 2 and u.output_tokens_details.reasoning_tokens == 0


def test_instructions_and_message_items(oai, engine):
    oai.responses.create(model="fake-model", instructions="Be brief.", input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                         {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour."}]},
        {"role": "user", "content": "Again"},
    ])  # fmt: skip
    assert decode(engine.calls[0][0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>developer\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nHello\nthere<|im_end|>\n<|im_start|>assistant\nBonjour.<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )


def test_refusals_and_item_ids(oai, engine):
    out = oai.responses.create(model="fake-model", input=[
        {"role": "user", "content": "Do it.", "id": "msg_mine"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}], "id": 7},
        {"role": "user", "content": "Please."}])  # fmt: skip
    assert "<|im_start|>assistant\nNo.<|im_end|>" in decode(engine.calls[0][0])
    ids = [item.id for item in oai.responses.input_items.list(out.id, order="asc").data]
    assert ids[0] == "msg_mine" and all(isinstance(i, str) and i.startswith("msg_") for i in ids) and len(set(ids)) == 3


def test_max_output_tokens_is_incomplete(oai, engine):
    out = oai.responses.create(model="fake-model", input="Hi", max_output_tokens=5)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output_text == REPLY[:5] and out.output[0].status == "incomplete" and out.usage.output_tokens == 5
    assert engine.calls[0][1].max_tokens == 5


def test_stream_events_build_the_same_response(oai):
    events, final = stream_events(oai, model="fake-model", input="Hi")
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]  # fmt: skip
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.status == "completed" and final.output_text == REPLY and final.usage.output_tokens == len(REPLY)
    stored = oai.responses.retrieve(final.id)
    assert stored.output_text == REPLY and stored.usage == final.usage and stored.output[0].id == final.output[0].id


def test_stream_on_the_wire(client):
    """Each event is `event: TYPE` and `data: {...}` with the same type; no [DONE]."""
    r = client.post("/v1/responses", json={"model": "fake-model", "input": "Hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = r.text.strip().split("\n\n")
    for block in blocks:
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[len("data: ") :])["type"] == head[len("event: ") :]
    assert blocks[-1].startswith("event: response.completed")


# --- the store --------------------------------------------------------------------------------------------------------


def test_retrieve_delete_and_input_items(oai, client):
    out = oai.responses.create(model="fake-model", input=[{"role": "user", "content": "one"},
                                                          {"role": "user", "content": "two"}])  # fmt: skip
    again = oai.responses.retrieve(out.id)
    assert again.id == out.id and again.output_text == REPLY and again.usage == out.usage
    items = oai.responses.input_items.list(out.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["one", "two"] and all(i.id.startswith("msg_") for i in items.data)
    newest = client.get(f"/v1/responses/{out.id}/input_items", params={"limit": 1}).json()
    assert [i["content"][0]["text"] for i in newest["data"]] == ["two"] and newest["has_more"] is True
    rest = client.get(f"/v1/responses/{out.id}/input_items", params={"limit": 1, "after": newest["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["one"] and rest["has_more"] is False
    oai.responses.delete(out.id)
    for call in (lambda: oai.responses.retrieve(out.id), lambda: oai.responses.delete(out.id),
                 lambda: oai.responses.input_items.list(out.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()


def test_store_false_is_not_kept(oai, store):
    out = oai.responses.create(model="fake-model", input="secret words", store=False)
    assert out.store is False and out.output_text == REPLY
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(out.id)
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="fake-model", input="more", previous_response_id=out.id)
    assert e.value.code == "previous_response_not_found"
    kept = oai.responses.create(model="fake-model", input="kept words")
    with open(store.path, "rb") as f:
        data = f.read()
    assert b"secret words" not in data and b"kept words" in data and kept.store is True


def test_previous_response_id_continues_the_conversation(oai, engine):
    first = oai.responses.create(model="fake-model", instructions="Old rules.", input="My name is Ada.")
    second = oai.responses.create(model="fake-model", instructions="New rules.", input="What is my name?",
                                  previous_response_id=first.id)  # fmt: skip
    assert second.previous_response_id == first.id
    assert decode(engine.calls[1][0]) == (
        "<|im_start|>system\nNew rules.<|im_end|>\n<|im_start|>user\nMy name is Ada.<|im_end|>\n"
        f"<|im_start|>assistant\n{REPLY}<|im_end|>\n<|im_start|>user\nWhat is my name?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # the instructions of the earlier response are not carried over
    third = oai.responses.create(model="fake-model", input="And now?", previous_response_id=second.id)
    assert decode(engine.calls[2][0]).count(REPLY) == 2 and "What is my name?" in decode(engine.calls[2][0])
    assert [i.content[0].text for i in oai.responses.input_items.list(third.id).data] == ["And now?"]


def test_a_server_without_a_store(engine):
    with TestClient(make_app(engine)) as c:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c, max_retries=0)
        out = oai.responses.create(model="fake-model", input="Hi")
        assert out.store is False and out.output_text == REPLY
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(out.id)
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="fake-model", input="Hi", previous_response_id=out.id)
        assert "--no-store" in e.value.message


def test_store_is_private_to_its_key(tmp_path, monkeypatch, store):
    """Another key's response reads exactly like an unknown one: retrieve, delete, input items, continuation."""
    from hearth.governance import keys as keys_mod
    from hearth.governance.keys import KeyStore, create_key

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(keys_mod, "SCRYPT_N", 2**10)
    key_a, _ = create_key("a")
    key_b, _ = create_key("b")
    with TestClient(make_app(FakeEngine(), keys=KeyStore(), responses_store=store)) as c:
        a, b = (openai.OpenAI(base_url="http://testserver/v1", api_key=k, http_client=c, max_retries=0)
                for k in (key_a, key_b))  # fmt: skip
        out = a.responses.create(model="fake-model", input="Alice's secret")
        unknown = "resp_" + "0" * 32
        seen = []
        for rid in (out.id, unknown):  # the same answers, but for the id
            calls = (lambda r: b.responses.retrieve(r), lambda r: b.responses.delete(r),
                     lambda r: b.responses.input_items.list(r),
                     lambda r: b.responses.create(model="fake-model", input="tell me", previous_response_id=r))  # fmt: skip
            errors = []
            for call in calls:
                with pytest.raises(openai.APIStatusError) as e:
                    call(rid)
                errors.append((e.value.status_code, json.dumps(e.value.response.json()).replace(rid, "ID")))
            seen.append(errors)
        assert seen[0] == seen[1] and [status for status, _ in seen[0]] == [404, 404, 404, 400]
        assert "Previous response with id 'ID' not found." in seen[0][3][1]
        assert c.get(f"/v1/responses/{out.id}").status_code == 401  # no key at all
        assert a.responses.retrieve(out.id).output_text == REPLY
        a.responses.delete(out.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(out.id)


def test_store_file_is_private(tmp_path):
    import os
    import stat

    path = tmp_path / "sub" / "responses.db"
    s = ResponseStore(str(path))
    s.put("k", {"id": "resp_1", "output": []}, [{"type": "message"}], 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert s.get("resp_1", "other") is None and s.get("resp_1", "k").num_input == 1
    assert not s.delete("resp_1", "other") and s.delete("resp_1", "k") and s.get("resp_1", "k") is None
    s.put("k", {"id": "resp_2", "output": [{"text": "distinctive-secret"}]}, [], 0)
    s.put("k", {"id": "resp_3", "output": []}, [], 0)
    assert b"distinctive-secret" in path.read_bytes()
    s.delete("resp_2", "k")  # deleted rows are overwritten in the file, not just unlinked
    assert b"distinctive-secret" not in path.read_bytes() and s.get("resp_3", "k") is not None
    s._conn.execute("PRAGMA secure_delete=OFF")  # the control: without it, the deleted text stays in the file
    s.put("k", {"id": "resp_4", "output": [{"text": "distinctive-secret"}]}, [], 0)
    s.delete("resp_4", "k")
    assert b"distinctive-secret" in path.read_bytes()
    s.close()


# --- errors -----------------------------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"input": 5}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [FUNCTION_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x\ud800"}, "input"),
    ({}, "input"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "x" * 600}, "input"),  # longer than the context
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_requests_are_400_in_openai_shape(client, body, param):
    r = client.post("/v1/responses", content=json.dumps({"model": "fake-model", **body}),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param or (error["param"] or "").startswith(param), error


def test_other_errors(client, engine):
    assert client.post("/v1/responses", json={"model": "other", "input": "x"}).status_code == 404
    assert client.post("/v1/responses", content=b"{not json").status_code == 400
    assert client.get("/v1/responses/resp_x/input_items", params={"limit": 0}).status_code == 404
    engine.state = "loading"
    assert client.post("/v1/responses", json={"input": "x"}).status_code == 503
    engine.state = "ready"
    engine.error = EngineError("the queue is full", 429)
    r = client.post("/v1/responses", json={"input": "x"})
    assert r.status_code == 429 and r.json()["error"]["message"] == "the queue is full"
    engine.error = None
    assert client.post("/v1/responses", json={"input": "x"}).json()["status"] == "completed"  # still up


def test_an_engine_failure_mid_stream_fails_the_response(oai, engine, store):
    engine.mid_stream_error = EngineError("internal error in the engine", 500)
    with oai.responses.stream(model="fake-model", input="Hi") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(events[-1].response.id)


def test_metrics_label_ids_as_one_series(client):
    client.get("/v1/responses/resp_abc")
    client.get("/v1/responses/resp_def/input_items")
    text = client.get("/metrics").text
    assert 'endpoint="/v1/responses/{id}",status="404"} 1.0' in text
    assert 'endpoint="/v1/responses/{id}/input_items",status="404"} 1.0' in text


# --- reasoning and tool calls on a scripted model -----------------------------------------------------------------


def scripted(architecture: str, scripts: list, template=None, seed: int = 0, store: ResponseStore | None = None):
    engine = ScriptedEngine(architecture, scripts, seed)
    app = create_app(engine, CharTokenizer(), template, "m", responses_store=store)
    test_client = TestClient(app)
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=test_client, max_retries=0)
    return engine, test_client, oai


def test_gpt_oss_function_call_round_trip(store):
    engine, test_client, oai = scripted("GptOssForCausalLM", [GPT_OSS_CALL, GPT_OSS_FINAL], store=store)
    with test_client:
        first = oai.responses.create(model="m", input="Weather in Paris?", tools=[FUNCTION_TOOL],
                                     reasoning={"effort": "high"})  # fmt: skip
        reasoning, call = first.output
        assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
        assert reasoning.content[0].type == "reasoning_text"
        assert reasoning.content[0].text == "User wants the weather. Call the tool."
        assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
        assert call.call_id.startswith("call_") and json.loads(call.arguments) == {"location": "Paris"}
        assert first.status == "completed" and first.reasoning.effort == "high"
        assert 0 < first.usage.output_tokens_details.reasoning_tokens < first.usage.output_tokens
        prompt = CharTokenizer().decode(engine.calls[0][0])
        assert "Reasoning: high" in prompt and "type get_weather" in prompt

        second = oai.responses.create(model="m", previous_response_id=first.id, tools=[FUNCTION_TOOL], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])  # fmt: skip
        assert second.output_text == "It is sunny in Paris." and [i.type for i in second.output] == ["reasoning", "message"]
        prompt = harmony_text(engine.calls[1][0])
        assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
                '{"location": "Paris"}<|call|>') in prompt  # fmt: skip
        assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}<|end|>' in prompt
        assert "User wants the weather. Call the tool." in prompt  # the turn's reasoning, before its final answer


def test_gpt_oss_items_in_the_input_render_as_chat_messages_do():
    """The same conversation as Responses items and as chat messages renders the same prompt."""
    items = [{"role": "user", "content": "Weather?"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]},
             {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"location": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_9", "output": "rain"}]  # fmt: skip
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "reasoning_content": "Hm.", "tool_calls": [
                    {"id": "call_9", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "rain"}]  # fmt: skip
    engine, test_client, oai = scripted("GptOssForCausalLM", [GPT_OSS_FINAL, GPT_OSS_FINAL])
    with test_client:
        oai.responses.create(model="m", input=items, tools=[FUNCTION_TOOL], instructions="Be kind.")
        oai.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be kind."}, *messages],
                                    tools=[WEATHER_TOOL])  # fmt: skip
    assert engine.calls[0][0] == engine.calls[1][0]


GPT_OSS_PREAMBLE_CALL = ("<|channel|>analysis<|message|>Think first.<|end|><|start|>assistant<|channel|>commentary"
                         "<|message|>Let me look.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
                         '<|constrain|>json<|message|>{"location": "Rome"}')  # fmt: skip
EXPECTED = {
    GPT_OSS_FINAL: [("reasoning", "The tool says sunny."), ("message", "It is sunny in Paris.")],
    GPT_OSS_CALL: [("reasoning", "User wants the weather. Call the tool."), ("function_call", '{"location": "Paris"}')],
    GPT_OSS_PREAMBLE_CALL: [("reasoning", "Think first."), ("message", "Let me look."),
                            ("function_call", '{"location": "Rome"}')],
}  # fmt: skip


def harmony_text(ids: list[int]) -> str:
    from hearth.chat.harmony import SPECIAL_TOKENS

    names = {v: k for k, v in SPECIAL_TOKENS.items()}
    return "".join(names.get(i, chr(i)) for i in ids)


def item_text(item) -> str:
    if item.type == "function_call":
        return item.arguments
    return item.content[0].text


class ChunkedEngine(ScriptedEngine):
    """Emits `pieces` (one token id each) for every request."""

    pieces: list[str] = []

    async def generate(self, prompt_ids, params, request_id):
        self.calls.append((prompt_ids, params))
        for k, piece in enumerate(self.pieces):
            await asyncio.sleep(0)
            last = k == len(self.pieces) - 1
            yield Delta(request_id, [1], piece, None, last, "stop" if last else None, len(prompt_ids), 0, k + 1)


@pytest.fixture(scope="module")
def chunked():
    """One server per model family for the Hypothesis tests: (engine, client) for gpt-oss and for <think>."""
    out = {}
    for name, architecture, template in (("harmony", "GptOssForCausalLM", None),
                                         ("think", "Qwen2ForCausalLM", ChatTemplate(R1_TEMPLATE))):  # fmt: skip
        engine = ChunkedEngine(architecture, [])
        test_client = TestClient(create_app(engine, CharTokenizer(), template, "m"))
        test_client.__enter__()
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=test_client, max_retries=0)
        out[name] = (engine, oai, test_client)
    yield out
    for _, _, test_client in out.values():
        test_client.__exit__(None, None, None)


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({c % len(text) for c in cuts} - {0})
    return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]


R1_OUTPUT = "Two plus two is four.\n</think>\n\nThe answer is 4."


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.sampled_from([GPT_OSS_FINAL, GPT_OSS_CALL, GPT_OSS_PREAMBLE_CALL, R1_OUTPUT]),
       cuts=st.lists(st.integers(1, 400), max_size=30))  # fmt: skip
def test_streamed_items_in_any_chunking(chunked, script, cuts):
    """However the model's text is cut into tokens, the stream's deltas add up to the items, the events come in order
    with consecutive sequence numbers, and the streamed response equals the unstreamed one."""
    name = "think" if script is R1_OUTPUT else "harmony"
    engine, oai, _ = chunked[name]
    engine.pieces = split(script, cuts)
    tools = [FUNCTION_TOOL] if script is not GPT_OSS_FINAL and name == "harmony" else None
    kwargs = {"model": "m", "input": "2+2?", **({"tools": tools} if tools else {})}
    events, final = stream_events(oai, **kwargs)
    whole = oai.responses.create(**kwargs)
    expected = EXPECTED.get(script) or [("reasoning", "Two plus two is four.\n"), ("message", "The answer is 4.")]
    assert [(i.type, item_text(i)) for i in final.output] == expected
    assert [(i.type, item_text(i)) for i in whole.output] == expected
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    for index, item in enumerate(final.output):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        kinds = [e.type for e in mine]
        assert kinds[0] == "response.output_item.added" and kinds[-1] == "response.output_item.done"
        assert mine[-1].item.id == mine[0].item.id == item.id
        delta_kind = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
                      "function_call": "response.function_call_arguments.delta"}[item.type]  # fmt: skip
        assert "".join(e.delta for e in mine if e.type == delta_kind) == item_text(item)
        if item.type != "function_call":
            assert kinds[1] == "response.content_part.added" and kinds[-2] == "response.content_part.done"
            assert mine[-2].part.text == item_text(item)
    if name == "think":
        assert final.usage.output_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("abort", "abort")])
def test_reasoning_only_when_cut_short(finish, reason):
    """Cut short inside the thought (the token limit, or an aborted request): an incomplete response saying why, with
    only its reasoning item."""
    engine, test_client, oai = scripted("Qwen2ForCausalLM", [], ChatTemplate(R1_TEMPLATE))

    async def generate(prompt_ids, params, request_id):
        for k, piece in enumerate(["Let", " me", " think"]):
            last = k == 2
            yield Delta(request_id, [1], piece, None, last, finish if last else None, len(prompt_ids), 0, k + 1)

    engine.generate = generate
    with test_client:
        out = oai.responses.create(model="m", input="?", max_output_tokens=3)
        events, _ = stream_events(oai, model="m", input="?", max_output_tokens=3)
    assert out.status == "incomplete" and out.incomplete_details.reason == reason
    assert [(i.type, i.status) for i in out.output] == [("reasoning", "incomplete")]
    assert out.output[0].content[0].text == "Let me think" and out.output_text == ""
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == reason
    assert [(i.type, i.status) for i in events[-1].response.output] == [("reasoning", "incomplete")]


# --- `hearth serve smollm2` -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_api_server import serve_smollm2

    store = ResponseStore(str(tmp_path_factory.mktemp("responses") / "responses.db"))
    try:
        with serve_smollm2(responses_store=store) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        store.close()


@pytest.mark.slow
def test_served_create_stream_retrieve_delete(served):
    out = served.responses.create(model="smollm2", input="What is the capital of France?", temperature=0,
                                  max_output_tokens=12)  # fmt: skip
    assert out.output_text and out.status in ("completed", "incomplete") and 0 < out.usage.output_tokens <= 12
    events, final = stream_events(served, model="smollm2", input="What is the capital of France?", temperature=0,
                                  max_output_tokens=12)  # fmt: skip
    assert final.output_text == out.output_text and final.status == out.status
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
    assert served.responses.retrieve(out.id).output_text == out.output_text
    served.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError):
        served.responses.retrieve(out.id)


@pytest.mark.slow
def test_served_continuation_and_function_output(served):
    first = served.responses.create(model="smollm2", input="My name is Ada. Say hi.", temperature=0,
                                    max_output_tokens=8)  # fmt: skip
    second = served.responses.create(model="smollm2", input="What is my name?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=8)  # fmt: skip
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    tool = served.responses.create(model="smollm2", temperature=0, max_output_tokens=8, tools=[FUNCTION_TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"location": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "sunny"}'}])  # fmt: skip
    assert tool.output_text and tool.output[-1].type == "message"
    with pytest.raises(openai.BadRequestError):
        served.responses.create(model="smollm2", input="x", previous_response_id="resp_unknown")


# --- any body: an answer or a 4xx, never a 500 --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-3, 3) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
texts = st.text(max_size=6)


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten, any JSON value otherwise: most bodies get deep enough to reach the items."""
    return st.integers(0, 9).flatmap(lambda k: json_values if k == 0 else valid)


parts = st.lists(st.fixed_dictionaries({"type": mostly(st.sampled_from(["input_text", "output_text", "reasoning_text",
                                                                        "summary_text", "refusal", "input_image"]))},
                                       optional={"text": mostly(texts)}), max_size=2)  # fmt: skip
items = st.fixed_dictionaries({}, optional={
    "type": mostly(st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference"])),
    "role": mostly(st.sampled_from(["user", "system", "developer", "assistant", "tool"])),
    "content": mostly(texts | parts), "summary": parts, "call_id": mostly(st.sampled_from(["c1", "c2"])),
    "name": st.sampled_from(["get_weather", "f"]), "arguments": mostly(texts), "output": mostly(texts | parts),
})  # fmt: skip
bodies = st.fixed_dictionaries({"input": mostly(texts | st.lists(items, max_size=4))}, optional={
    "instructions": mostly(texts),
    "tools": mostly(st.lists(st.sampled_from([FUNCTION_TOOL, FUNCTION_TOOL, {"type": "web_search"},
                                              {"type": "function", "name": 3}]), max_size=2)),
    "tool_choice": mostly(st.sampled_from(["auto", "none", "required", {"type": "function", "name": "get_weather"},
                                           {"type": "function"}])),
    "text": mostly(st.fixed_dictionaries({"format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                                                     {"type": "json_schema", "name": "x", "schema": {}},
                                                                     {"type": "json_schema"}])})),
    "reasoning": mostly(st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "xhigh", "big"])})),
    "max_output_tokens": mostly(st.integers(-1, 40)), "stream": st.booleans(), "store": st.booleans(),
    "previous_response_id": mostly(st.sampled_from([None, None, None, "resp_x"])),
    "metadata": mostly(st.dictionaries(texts, texts, max_size=2)),
})  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    store = ResponseStore(str(tmp_path_factory.mktemp("fuzz") / "responses.db"))
    with TestClient(make_app(FakeEngine(), responses_store=store), raise_server_exceptions=False) as c:
        yield c
    store.close()


@settings(max_examples=300, deadline=None)
@given(body=bodies)
def test_any_body_is_answered_or_refused_with_a_4xx(fuzz_client, body):
    r = fuzz_client.post("/v1/responses", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400), (r.status_code, r.text)
    if r.status_code == 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream"):
        assert r.text.rstrip().split("\n\n")[-1].startswith(("event: response.completed", "event: response.incomplete"))
    else:
        assert r.json()["status"] in ("completed", "incomplete")


# --- hearth serve --no-store ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--no-store"]])
def test_serve_keeps_responses_unless_no_store(monkeypatch, tmp_path, capsys, flags):
    import logging
    import os

    import uvicorn

    import hearth.cli.serve as serve
    from hearth.cli.main import main

    class NoServer:
        def __init__(self, config) -> None:
            self.should_exit = False

        def run(self, sockets=None) -> None:
            pass

    seen: dict = {}

    def build_app(*args, **kwargs):
        seen.update(kwargs)
        engine = FakeEngine()
        return make_app(engine), engine

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))
    monkeypatch.setattr(uvicorn, "Server", NoServer)
    monkeypatch.setattr(serve, "build_app", build_app)
    logger = logging.getLogger("hearth")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        assert main(["serve", "smollm2", *flags]) == 0
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    out = capsys.readouterr().out
    if flags:
        assert seen["responses_store"] is None and "Responses store: off" in out
    else:
        path = str(tmp_path / "responses.db")
        assert seen["responses_store"].path == path and os.path.exists(path) and f"Responses store: {path}" in out
        seen["responses_store"].close()
