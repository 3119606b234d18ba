"""Reasoning and tool calls through the server, with the official client, on scripted model output.

The model math is tested elsewhere; here a scripted engine emits a fixed completion in random chunks, so these tests
check the plumbing: chat format choice, parsers, reasoning_content, tool_calls, finish_reason and usage.
"""

from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest
from fastapi.testclient import TestClient

from hearth.api.app import create_app
from hearth.chat.template import ChatTemplate
from hearth.engine.protocol import Delta, EngineStats, ModelInfo

HARMONY_SPECIALS = {"<|return|>": 200002, "<|call|>": 200012}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}}}  # fmt: skip


class CharTokenizer:
    bos_token, eos_token, eos_token_ids, chat_template = "", "", [2], None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i < 0x110000)

    def token_to_id(self, text: str) -> int | None:
        return HARMONY_SPECIALS.get(text)


class ScriptedEngine:
    """Answers every request with the next scripted text, cut into random chunks (one token per chunk)."""

    def __init__(self, architecture: str, scripts: list[str], seed: int = 0):
        self.state = "ready"
        self.model_info = ModelInfo("scripted", 4096, architecture)
        self.stats = EngineStats()
        self.scripts = list(scripts)
        self.rng = random.Random(seed)
        self.calls: list = []

    async def generate(self, prompt_ids, params, request_id):
        self.calls.append((prompt_ids, params))
        text = self.scripts.pop(0)
        cuts = sorted(self.rng.sample(range(1, len(text)), min(len(text) - 1, 12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for k, piece in enumerate(pieces):
            await asyncio.sleep(0)
            last = k == len(pieces) - 1
            yield Delta(request_id, [1], piece, None, last, "stop" if last else None, len(prompt_ids), 0, k + 1)

    async def abort(self, request_id):
        pass


def client_for(engine, template=None):
    app = create_app(engine, CharTokenizer(), template, "m")
    test_client = TestClient(app)
    return test_client, openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=test_client,
                                      max_retries=0)  # fmt: skip


GPT_OSS_CALL = (
    "<|channel|>analysis<|message|>User wants the weather. Call the tool.<|end|><|start|>assistant"
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"location": "Paris"}'
)  # the engine stops on <|call|> and does not emit it
GPT_OSS_FINAL = ("<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final"
                 "<|message|>It is sunny in Paris.")  # fmt: skip


def test_gpt_oss_tool_call_round_trip():
    engine = ScriptedEngine("GptOssForCausalLM", [GPT_OSS_CALL, GPT_OSS_FINAL])
    test_client, oai = client_for(engine)
    with test_client:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        first = oai.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL],
                                            reasoning_effort="high")  # fmt: skip
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Paris"}
        assert choice.message.reasoning_content == "User wants the weather. Call the tool."
        assert first.usage.completion_tokens_details.reasoning_tokens == len(choice.message.reasoning_content)
        prompt_ids, params = engine.calls[0]
        assert set(params.stop_token_ids) >= {200002, 200012} and not params.skip_special_tokens
        assert "Reasoning: high" in CharTokenizer().decode(prompt_ids)
        assert "get_weather" in CharTokenizer().decode(prompt_ids)

        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]  # fmt: skip
        second = oai.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == "It is sunny in Paris."
        assert second.choices[0].finish_reason == "stop"
        assert '{"sky": "sunny"}' in CharTokenizer().decode(engine.calls[1][0])


@pytest.mark.parametrize("seed", range(4))
def test_gpt_oss_streamed_reasoning_and_tool_call(seed):
    engine = ScriptedEngine("GptOssForCausalLM", [GPT_OSS_FINAL, GPT_OSS_CALL], seed=seed)
    test_client, oai = client_for(engine)
    with test_client:
        stream = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                             stream_options={"include_usage": True})  # fmt: skip
        reasoning, content, usage = "", "", None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
                content += c.delta.content or ""
        assert reasoning == "The tool says sunny." and content == "It is sunny in Paris."
        assert usage.completion_tokens_details.reasoning_tokens == len(reasoning)

        stream = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                             tools=[WEATHER_TOOL])  # fmt: skip
        calls, finish = [], None
        for chunk in stream:
            for c in chunk.choices:
                calls += c.delta.tool_calls or []
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and len(calls) == 1 and calls[0].index == 0
        assert calls[0].function.name == "get_weather"


R1_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}"
               "<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_r1_think_starts_inside_the_thought(stream):
    engine = ScriptedEngine("Qwen2ForCausalLM", ["Two plus two is four.\n</think>\n\nThe answer is 4."])
    test_client, oai = client_for(engine, ChatTemplate(R1_TEMPLATE))
    with test_client:
        kwargs = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}]}
        if stream:
            reasoning = content = ""
            for chunk in oai.chat.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    reasoning += getattr(c.delta, "reasoning_content", None) or ""
                    content += c.delta.content or ""
        else:
            message = oai.chat.completions.create(**kwargs).choices[0].message
            reasoning, content = message.reasoning_content, message.content
    assert reasoning.strip() == "Two plus two is four." and content == "The answer is 4."


HERMES_TEMPLATE = ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% for m in messages %}"
                   "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                   "{# calls look like <tool_call>{...}</tool_call> #}")  # fmt: skip


def test_hermes_tool_calls_and_tool_choice_none():
    output = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"location": "Oslo"}}</tool_call>'
    engine = ScriptedEngine("Qwen2ForCausalLM", [output, output])
    test_client, oai = client_for(engine, ChatTemplate(HERMES_TEMPLATE))
    with test_client:
        kwargs = {"model": "m", "messages": [{"role": "user", "content": "Oslo weather?"}], "tools": [WEATHER_TOOL]}
        choice = oai.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"location": "Oslo"}
        assert getattr(choice.message, "reasoning_content", None) is None
        plain = oai.chat.completions.create(tool_choice="none", **kwargs).choices[0]
        assert plain.message.tool_calls is None and plain.message.content == output
        assert "<tools>" not in CharTokenizer().decode(engine.calls[1][0])


def test_model_card_lists_capabilities():
    test_client, oai = client_for(ScriptedEngine("GptOssForCausalLM", []))
    with test_client:
        card = test_client.get("/v1/models").json()["data"][0]
    assert card["capabilities"] == ["reasoning", "reasoning_effort", "tools"]
    test_client, oai = client_for(ScriptedEngine("LlamaForCausalLM", []), ChatTemplate(R1_TEMPLATE))
    with test_client:
        assert test_client.get("/v1/models").json()["data"][0]["capabilities"] == ["reasoning"]


def test_requests_reach_the_usage_ledger(tmp_path):
    from hearth.accounting.usage import UsageLedger

    ledger = UsageLedger(str(tmp_path / "usage.db"))
    engine = ScriptedEngine("GptOssForCausalLM", [GPT_OSS_FINAL, GPT_OSS_FINAL])
    app = create_app(engine, CharTokenizer(), None, "m", ledger=ledger)
    with TestClient(app) as test_client:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=test_client, max_retries=0)
        for _ in range(2):
            oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        test_client.get("/v1/models")  # not a generation: not in the ledger
    records = ledger.records()
    assert len(records) == 2
    assert records[0].model == "m" and records[0].completion_tokens > 0
    assert records[0].reasoning_tokens == len("The tool says sunny.") and records[0].duration_s > 0
