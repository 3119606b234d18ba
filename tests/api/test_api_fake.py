"""The API layer against a fake EngineClient: shapes, SSE framing, every error case, disconnects. Fast, no model."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.api.app import create_app
from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate
from hearth.engine.protocol import Delta, EngineError, EngineStats, ModelInfo
from hearth.sampling_params import SamplingParams, TokenLogprob

REPLY = "Hello world! This is hearth."
BOS = 1


class FakeTokenizer:
    """One token per character (its code point); ids 1 and 2 are BOS and EOS."""

    bos_token = "<s>"
    eos_token = "</s>"
    eos_token_ids = [2]
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) if i > 2 else ("" if skip_special_tokens else "<s>") for i in ids)


class FakeEngine:
    """Replies REPLY one character per Delta (prefixed with the seed when one is given), applying stop strings and
    max_tokens as the real engine does. `error` makes generate raise; `delay` slows every token down.
    """

    def __init__(self, max_model_len: int = 512, delay: float = 0.0) -> None:
        self.state = "ready"
        self.model_info = ModelInfo("fake", max_model_len, "FakeForCausalLM")
        self.delay = delay
        self.error: Exception | None = None
        self.mid_stream_error: Exception | None = None
        self.calls: list[tuple[list[int], SamplingParams, str]] = []
        self.aborted: list[str] = []
        self.active: set[str] = set()
        self.spec_totals = (0, 0)  # speculative draft tokens scored and kept, as the engine's running totals

    @property
    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.active), num_waiting=0, kv_cache_usage=len(self.active) / 10,
                           num_kvcache_blocks=10, num_draft_tokens=self.spec_totals[0],
                           num_accepted_tokens=self.spec_totals[1])  # fmt: skip

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        self.calls.append((prompt_ids, params, request_id))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        self.active.add(request_id)
        try:
            reply = REPLY if params.seed is None else f"[{params.seed}] {REPLY}"
            # like the real engine's detokenizer: text that may become a stop string is held back, never emitted
            hits = [(reply.find(s), s) for s in params.stop if s in reply]
            cut, stop = min(hits) if hits else (len(reply), "")
            num_tokens = cut + len(stop) if hits else len(reply)
            if params.max_tokens is not None and params.max_tokens < num_tokens:
                num_tokens, reason_at_end = params.max_tokens, "length"
            else:
                reason_at_end = "stop"
            for k in range(num_tokens):
                await asyncio.sleep(self.delay)
                if self.mid_stream_error is not None and k == 3:
                    raise self.mid_stream_error
                ch = reply[k]
                text = ch if k < cut else ""
                reason = reason_at_end if k + 1 == num_tokens else None
                lp = None
                if params.logprobs is not None:
                    top = [(ord(ch), -0.25), (ord("x"), -2.0), (ord("y"), -3.0)][: params.logprobs]
                    lp = [TokenLogprob(ord(ch), -0.25, top)]
                yield Delta(request_id, [ord(ch)], text, lp, reason is not None, reason, len(prompt_ids), 2, k + 1)
        finally:
            self.active.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False


def make_app(engine: FakeEngine, **kwargs):
    template = ChatTemplate(CHATML_TEMPLATE, "<s>", "</s>")
    return create_app(engine, FakeTokenizer(), template, "fake-model", **kwargs)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(make_app(engine, max_body_bytes=64 * 1024)) as c:
        yield c


@pytest.fixture
def oai(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def chat(client, **body):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **body}
    return client.post("/v1/chat/completions", json=body)


def sse_events(raw: bytes) -> list:
    """Parse an SSE body strictly: every event is one `data: ` line followed by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        payload = lines[0][len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --- models, health, metrics ----------------------------------------------------------------------------------------


def test_health_models_and_model(client, engine):
    assert client.get("/health").json() == {"status": "ready", "model": "fake-model"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0] | {"created": 0} == {"id": "fake-model", "object": "model", "created": 0,
                                                  "owned_by": "hearth", "max_model_len": 512, "capabilities": []}  # fmt: skip
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    engine.state = "loading"
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"


def test_openai_client_models(oai):
    assert [m.id for m in oai.models.list()] == ["fake-model"]


def test_metrics_own_registry(client, engine):
    chat(client)
    chat(client, model="nope")
    text = client.get("/metrics").text
    assert 'hearth_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'hearth_requests_total{endpoint="/v1/chat/completions",status="404"} 1.0' in text
    assert "hearth_generation_tokens_total 28.0" in text
    assert "hearth_time_to_first_token_seconds_count 1.0" in text
    assert "hearth_time_per_output_token_seconds_count 27.0" in text
    assert "hearth_num_requests_waiting 0.0" in text and "hearth_kv_cache_usage_ratio 0.0" in text
    engine.spec_totals = (8, 5)  # the engine's speculative totals reach the counters
    text = client.get("/metrics").text
    assert "hearth_spec_decode_num_draft_tokens_total 8.0" in text
    assert "hearth_spec_decode_num_accepted_tokens_total 5.0" in text
    # a second app has its own registry: nothing counted yet
    with TestClient(make_app(FakeEngine())) as other:
        assert "hearth_requests_total{" not in other.get("/metrics").text


# --- chat -----------------------------------------------------------------------------------------------------------


def test_chat_basic_shape(client, engine):
    r = chat(client, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
             repetition_penalty=1.1, user="someone", response_format={"type": "json_object"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]  # fmt: skip
    prompt_ids, params, request_id = engine.calls[0]
    assert request_id == body["id"] + "-0"
    # rendered with the template and encoded without adding BOS again
    assert prompt_ids == FakeTokenizer().encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 5, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert params.max_tokens is None and params.seed is None and params.logprobs is None
    num_prompt = len(prompt_ids)
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": len(REPLY),
                             "total_tokens": num_prompt + len(REPLY), "prompt_tokens_details": {"cached_tokens": 2},
                             "completion_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip


def test_chat_defaults_follow_openai(client, engine):
    chat(client)
    params = engine.calls[0][1]
    assert params.temperature == 1.0 and params.max_tokens is None and params.stop == []


def test_chat_text_parts_and_openai_client(oai, engine):
    out = oai.chat.completions.create(model="fake-model", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], max_tokens=5)  # fmt: skip
    assert out.choices[0].message.content == REPLY[:5] and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens_details.cached_tokens == 2
    assert "user\na\nb<|im_end|>" in FakeTokenizer().decode(engine.calls[0][0])


def test_chat_n2_seeds_and_ids(client, engine):
    body = chat(client, n=2, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [f"[7] {REPLY}", f"[8] {REPLY}"]
    assert sorted(call[2] for call in engine.calls) == [body["id"] + "-0", body["id"] + "-1"]
    assert sorted(call[1].seed for call in engine.calls) == [7, 8]
    assert body["usage"]["completion_tokens"] == 2 * len(REPLY) + 8
    assert body["usage"]["prompt_tokens"] == len(engine.calls[0][0])  # the prompt counts once


@pytest.mark.parametrize("stop, expected", [("!", ["!"]), (["is", "zz"], ["is", "zz"])])
def test_chat_stop_passthrough(client, engine, stop, expected):
    body = chat(client, stop=stop).json()
    assert engine.calls[0][1].stop == expected
    assert body["choices"][0]["message"]["content"] == REPLY[: min(REPLY.find(s) for s in expected if s in REPLY)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_max_completion_tokens_wins(client, engine):
    body = chat(client, max_tokens=9, max_completion_tokens=4).json()
    assert engine.calls[0][1].max_tokens == 4
    assert body["choices"][0]["message"]["content"] == REPLY[:4] and body["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_shape(client, engine):
    body = chat(client, logprobs=True, top_logprobs=2, max_tokens=3).json()
    assert engine.calls[0][1].logprobs == 2
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["H", "e", "l"]
    assert content[0] == {"token": "H", "logprob": -0.25, "bytes": [72], "top_logprobs": [
        {"token": "H", "logprob": -0.25, "bytes": [72]}, {"token": "x", "logprob": -2.0, "bytes": [120]}]}  # fmt: skip
    body = chat(client, logprobs=True, max_tokens=2).json()
    assert engine.calls[1][1].logprobs == 0
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_tools_and_reasoning_effort_reach_template(engine):
    seen = {}

    class Recording(ChatTemplate):
        def render(self, messages, add_generation_prompt=True, tools=None, **kwargs):
            seen.update(tools=tools, kwargs=kwargs)
            return super().render(messages, add_generation_prompt, tools, **kwargs)

    app = create_app(engine, FakeTokenizer(), Recording(CHATML_TEMPLATE), "fake-model")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with TestClient(app) as c:
        assert chat(c, tools=[tool], tool_choice="auto", reasoning_effort="low").status_code == 200
        assert seen["tools"][0]["function"]["name"] == "get_weather" and seen["kwargs"] == {"reasoning_effort": "low"}
        chat(c, tools=[tool], tool_choice="none")
        assert seen["tools"] is None


# --- completions ----------------------------------------------------------------------------------------------------


def test_completions_shape_and_prompt_forms(client, engine):
    body = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Once", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": REPLY[:5], "logprobs": None, "finish_reason": "length"}]
    assert engine.calls[0][0] == [BOS, *map(ord, "Once")]  # a text prompt gets BOS
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["total_tokens"] == 10
    body = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [call[0] for call in engine.calls[1:]] == [[BOS, 97]] * 2 + [[BOS, 98]] * 2
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 8
    client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert engine.calls[-1][0] == [5, 6, 7]
    client.post("/v1/completions", json={"prompt": [[5, 6], [8]], "max_tokens": 1})
    assert [call[0] for call in engine.calls[-2:]] == [[5, 6], [8]]


def test_completions_logprobs_shape(client, engine):
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2}).json()
    assert engine.calls[0][1].logprobs == 2
    assert body["choices"][0]["logprobs"] == {"tokens": ["H", "e", "l"], "token_logprobs": [-0.25] * 3,
                                              "top_logprobs": [{"H": -0.25, "x": -2.0}, {"e": -0.25, "x": -2.0},
                                                               {"l": -0.25, "x": -2.0}],
                                              "text_offset": [0, 1, 2]}  # fmt: skip


def test_completions_echo(client):
    body = client.post("/v1/completions", json={"prompt": "Say: ", "max_tokens": 5, "echo": True}).json()
    assert body["choices"][0]["text"] == "Say: " + REPLY[:5]
    body = client.post("/v1/completions", json={"prompt": [83, 97], "max_tokens": 1, "echo": True}).json()
    assert body["choices"][0]["text"] == "Sa" + REPLY[:1]
    raw = client.post("/v1/completions", json={"prompt": "Say: ", "max_tokens": 2, "echo": True, "stream": True})
    events = sse_events(raw.content)
    assert events[0]["choices"][0]["text"] == "Say: "
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Say: " + REPLY[:2]


def test_completions_openai_client(oai):
    out = oai.completions.create(model="fake-model", prompt="Hi", max_tokens=4, logprobs=1)
    assert out.choices[0].text == REPLY[:4] and out.choices[0].logprobs.tokens == list(REPLY[:4])
    stream = oai.completions.create(model="fake-model", prompt="Hi", max_tokens=4, stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY[:4]
    assert chunks[-1].usage.completion_tokens == 4


# --- streaming ------------------------------------------------------------------------------------------------------


def test_chat_stream_framing_raw_bytes(engine):
    app = make_app(engine)

    async def run() -> bytes:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 3,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return r.content

    raw = asyncio.run(run())
    assert raw.startswith(b'data: {"id":"chatcmpl-') and raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" in c for c in chunks)  # null until the last chunk, with include_usage
    first, *content, final, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]  # fmt: skip
    assert [c["choices"][0]["delta"] for c in content] == [{"content": ch} for ch in REPLY[:3]]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in content)
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 3


def test_chat_stream_without_usage_and_n2(client):
    r = chat(client, stream=True, n=2, max_tokens=2, logprobs=True, top_logprobs=1)
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    by_index: dict[int, list] = {0: [], 1: []}
    for e in events[:-1]:
        (choice,) = e["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == REPLY[:2]
        assert [c["finish_reason"] for c in choices][-1] == "length"
        assert choices[1]["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "H"


def test_chat_stream_openai_client(oai):
    messages = [{"role": "user", "content": "Hi"}]
    stream = oai.chat.completions.create(model="fake-model", messages=messages, stream=True, stop=["world"],
                                         stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len("Hello world")


def test_mid_stream_engine_error_becomes_error_event(client, engine):
    engine.mid_stream_error = EngineError("internal error while generating", 500)
    events = sse_events(chat(client, stream=True).content)
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "internal error while generating"
    r = chat(client)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


# --- errors ---------------------------------------------------------------------------------------------------------


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_malformed_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    err = error_of(r, 400)
    assert "malformed JSON" in err["message"] and err["type"] == "invalid_request_error"
    err = error_of(client.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "JSON object" in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),  # no coercion from strings, as OpenAI
    ({"max_tokens": "5"}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"stream": "maybe"}, "stream"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])  # fmt: skip
def test_bad_fields_are_400_naming_the_field(client, body, param):
    err = error_of(chat(client, **body), 400)
    assert err["param"] == param, err
    assert err["message"]


@pytest.mark.parametrize("body, param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**30}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),  # the second choice samples with seed + 1
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),
])  # fmt: skip
def test_values_the_sampler_cannot_use_are_400_before_admission(client, engine, body, param):
    for send in (chat, lambda c, **b: c.post("/v1/completions", json={"prompt": "Hi", **b})):
        err = error_of(send(client, **body), 400)
        assert err["param"] == param and param in err["message"], err
    assert not engine.calls


@pytest.mark.parametrize("body", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-40},
                                  {"top_p": 5e-324}, {"top_p": 1e-300}, {"seed": 2**64 - 1}, {"seed": -(2**63)}])  # fmt: skip
def test_tiny_positive_values_are_accepted(client, engine, body):
    assert chat(client, **body).status_code == 200
    params = engine.calls[-1][1]
    assert params.is_greedy == ("temperature" in body)


def test_missing_messages_and_prompt(client):
    assert error_of(client.post("/v1/chat/completions", json={"model": "fake-model"}), 400)["param"] == "messages"
    assert error_of(client.post("/v1/completions", json={}), 400)["param"] == "prompt"
    assert error_of(client.post("/v1/completions", json={"prompt": []}), 400)["param"] == "prompt"
    err = error_of(client.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1}), 400)
    assert err["param"] == "echo"


def test_unknown_model_is_404(client, oai):
    err = error_of(chat(client, model="gpt-4o"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4o" in err["message"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4o", prompt="x")
    err = error_of(client.get("/v1/nothing-here"), 404)
    assert "no such route" in err["message"]


def test_prompt_longer_than_context_is_400_with_both_counts():
    with TestClient(make_app(FakeEngine(max_model_len=20))) as client:
        err = error_of(client.post("/v1/completions", json={"prompt": "x" * 30}), 400)
        assert "20" in err["message"] and "31" in err["message"] and err["param"] == "prompt"
        assert err["code"] == "context_length_exceeded"
        err = error_of(chat(client, messages=[{"role": "user", "content": "y" * 40}]), 400)
        assert "20" in err["message"] and err["param"] == "messages"
        err = error_of(client.post("/v1/completions", json={"prompt": "x" * 5, "max_tokens": 50}), 400)
        assert "20" in err["message"] and "6 in the prompt" in err["message"] and err["param"] == "max_tokens"


def test_every_prompt_of_a_completion_must_fit_and_none_reaches_the_engine_when_one_does_not():
    engine = FakeEngine(max_model_len=20)
    with TestClient(make_app(engine)) as client:
        err = error_of(client.post("/v1/completions", json={"prompt": ["short", "x" * 25, "y" * 30]}), 400)
        assert "26 tokens" in err["message"] and err["param"] == "prompt" and err["code"] == "context_length_exceeded"
        err = error_of(client.post("/v1/completions", json={"prompt": ["ab", "x" * 10], "max_tokens": 10}), 400)
        assert "11 in the prompt" in err["message"] and err["param"] == "max_tokens"
        assert engine.calls == []


@given(max_len=st.integers(1, 64), lengths=st.lists(st.integers(1, 80), min_size=1, max_size=6),
       max_tokens=st.none() | st.integers(1, 80))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_check_length_fits_every_prompt_and_returns_the_room_after_the_longest(max_len, lengths, max_tokens):
    from hearth.api.errors import APIError
    from hearth.api.state import ServerState

    state = ServerState(FakeEngine(max_model_len=max_len), FakeTokenizer(), None, "fake-model", None)
    fits = all(n < max_len and (max_tokens is None or n + max_tokens <= max_len) for n in lengths)
    if fits:
        assert state.check_length(lengths, max_tokens, "prompt") == max_len - max(lengths)
    else:
        with pytest.raises(APIError) as refused:
            state.check_length(lengths, max_tokens, "prompt")
        assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
        assert str(max_len) in refused.value.message


def test_body_over_limit_is_413(client):
    big = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    err = error_of(client.post("/v1/chat/completions", json=big), 413)
    assert "limit" in err["message"]

    def chunks():  # no Content-Length: the middleware counts the bytes as they arrive
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    error_of(client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_engine_refusals_map_to_status(client, engine, oai):
    engine.error = EngineError("the server is busy: too many requests are waiting", 429)
    r = chat(client)
    err = error_of(r, 429)
    assert r.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
    r = chat(client, stream=True)  # refused before the stream starts: a plain HTTP error
    assert r.status_code == 429 and r.headers["content-type"].startswith("application/json")
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    engine.error = EngineError("the prompt has 900 tokens, but this model's context is 512 tokens", 400, "messages")
    err = error_of(chat(client), 400)
    assert err["param"] == "messages" and "900" in err["message"]


def test_not_ready_is_503(client, engine, oai):
    engine.state = "loading"
    err = error_of(chat(client), 503)
    assert "loading" in err["message"]
    error_of(client.post("/v1/completions", json={"prompt": "x"}), 503)
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])


def test_template_error_is_400(engine):
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with TestClient(create_app(engine, FakeTokenizer(), template, "fake-model")) as c:
        err = error_of(chat(c), 400)
        assert "roles must alternate" in err["message"] and err["param"] == "messages"


def test_logs_never_contain_prompt_or_completion_text(client, caplog):
    secret = "xyzzy-secret-prompt"
    with caplog.at_level("DEBUG"):
        chat(client, messages=[{"role": "user", "content": secret}])
        client.post("/v1/completions", json={"prompt": secret, "max_tokens": 3, "stream": True})
        chat(client, messages=[{"role": "user", "content": secret}], temperature="bad")
    assert "/v1/chat/completions 200" in caplog.text and "completion tokens" in caplog.text
    assert secret not in caplog.text and "Hello" not in caplog.text


def test_keep_alive_while_waiting(engine, monkeypatch):
    from hearth.api import sse

    monkeypatch.setattr(sse, "KEEP_ALIVE_SECONDS", 0.01)
    engine.delay = 0.05
    with TestClient(make_app(engine)) as c:
        raw = chat(c, stream=True, max_tokens=2).content
    assert sse.KEEP_ALIVE in raw
    assert [e for e in sse_events(raw.replace(sse.KEEP_ALIVE, b""))][-1] == "[DONE]"


def test_server_survives_bad_requests(client):
    for _ in range(3):
        client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        chat(client, temperature="x")
        chat(client, model="missing")
    assert chat(client).json()["choices"][0]["message"]["content"] == REPLY


# --- disconnects (a real server: only real sockets disconnect) ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server():
    import uvicorn

    engine = FakeEngine(delay=0.02)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_stream_disconnect_aborts_every_choice(live_server):
    engine, url = live_server
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "n": 2}
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(5):
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                next(r.iter_bytes())
            # closing the response mid-stream drops the connection
        wait_for(lambda: not engine.active)
        assert len(engine.aborted) == 10 and len(set(engine.aborted)) == 10
        assert c.post("/v1/chat/completions", json={**body, "stream": False}).status_code == 200


def test_non_stream_disconnect_aborts(live_server):
    engine, url = live_server

    async def go() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            task = asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "n": 3}))
            await asyncio.sleep(0.2)
            task.cancel()

    asyncio.run(go())
    wait_for(lambda: len(engine.aborted) == 3)
    wait_for(lambda: not engine.active)


# --- hearth serve ---------------------------------------------------------------------------------------------------


def test_serve_refuses_non_loopback_host(capsys, monkeypatch, tmp_path):
    from hearth.cli.main import main
    from hearth.cli.serve import is_loopback

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))  # no keys on file
    monkeypatch.setattr("hearth.log.setup_logging", lambda *args, **kwargs: None)  # keep pytest's log capture

    assert main(["serve", "smollm2", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--insecure-no-auth" in err and len(err.splitlines()) == 1
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com") and not is_loopback("192.168.1.5")


def test_serve_loading_engine_states():
    from hearth.engine.loading import LoadingEngine

    gate = threading.Event()
    fake = FakeEngine()

    def load():
        gate.wait(5)
        return fake

    engine = LoadingEngine(load)
    with TestClient(make_app(engine)) as c:
        assert c.get("/health").json()["status"] == "loading" and chat(c).status_code == 503
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] is None
        gate.set()
        wait_for(lambda: engine.state == "ready")
        assert fake.started is True and chat(c).json()["choices"][0]["message"]["content"] == REPLY

    failures = []

    def broken():
        raise OSError("weights missing")

    engine = LoadingEngine(broken, failures.append)
    with TestClient(make_app(engine)) as c:
        wait_for(lambda: engine.state == "failed")
        assert c.get("/health").status_code == 503 and isinstance(failures[0], OSError)


def test_serve_help_and_curl_example():
    from hearth.cli.main import build_parser
    from hearth.cli.serve import base_url, curl_example

    args = build_parser().parse_args(["serve"])  # no model: every local model, each loaded on its first request
    assert (args.model, args.only, args.host, args.port, args.keep_alive) == (None, False, "127.0.0.1", 8000, "5m")
    assert build_parser().parse_args(["serve", "--only"]).only  # alone: the embedded smollm2, as before
    assert base_url("::1", 8000) == "http://[::1]:8000"
    example = curl_example("http://127.0.0.1:8000", "smollm2")
    assert example.startswith("curl http://127.0.0.1:8000/v1/chat/completions") and '"model": "smollm2"' in example
