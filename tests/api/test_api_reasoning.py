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
from hypothesis import given, settings
from hypothesis import strategies as st

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
    """Answers every request with the next script, one token per Delta: a text is cut into random chunks (one token
    each); a list is the tokens' texts as given."""

    def __init__(self, architecture: str, scripts: list[str], seed: int = 0):
        self.state = "ready"
        self.model_info = ModelInfo("scripted", 4096, architecture)
        self.stats = EngineStats()
        self.scripts = list(scripts)
        self.rng = random.Random(seed)
        self.calls: list = []

    async def generate(self, prompt_ids, params, request_id):
        self.calls.append((prompt_ids, params))
        script = self.scripts.pop(0)
        if isinstance(script, str):
            cuts = sorted(self.rng.sample(range(1, len(script)), min(len(script) - 1, 12)))
            pieces = [script[a:b] for a, b in zip([0, *cuts], [*cuts, len(script)])]
        else:
            pieces = list(script)
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
        assert 0 < first.usage.completion_tokens_details.reasoning_tokens < first.usage.completion_tokens
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
        assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens

        stream = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                             tools=[WEATHER_TOOL])  # fmt: skip
        calls, finish = [], None
        for chunk in stream:
            for c in chunk.choices:
                calls += c.delta.tool_calls or []
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and len(calls) == 1 and calls[0].index == 0
        assert calls[0].function.name == "get_weather"


GPT_OSS_FINAL_TOKENS = [
    "<|channel|>",
    "analysis",
    "<|message|>",
    "The",
    " tool",
    " says",
    " sunny",
    ".",
    "<|end|>",
    "<|start|>",
    "assistant",
    "<|channel|>",
    "final",
    "<|message|>",
    "It",
    " is",
    " sunny",
    " in",
    " Paris",
    ".",
]  # fmt: skip  (9 tokens through <|end|>)
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
    engine = ScriptedEngine("GptOssForCausalLM", [GPT_OSS_FINAL_TOKENS, GPT_OSS_FINAL_TOKENS])
    app = create_app(engine, CharTokenizer(), None, "m", ledger=ledger)
    with TestClient(app) as test_client:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=test_client, max_retries=0)
        for _ in range(2):
            oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        test_client.get("/v1/models")  # not a generation: not in the ledger
    records = ledger.records()
    assert len(records) == 2
    assert records[0].model == "m" and records[0].completion_tokens > 0
    assert records[0].reasoning_tokens == 9 and records[0].completion_tokens == 20 and records[0].duration_s > 0


# ---- usage.completion_tokens_details.reasoning_tokens counts generated tokens ---------------------------------------

R1_TOKENS = ["Two", " plus", " two", " is", " four", ".", "\n", "</think>", "\n\n", "The", " answer", " is", " 4", "."]
R1_SPLIT_TAG = ["Let", " me", " think", ".", "</", "think", ">", "\n\n", "4", "."]  # the tag in three tokens
QWEN3_TOKENS = ["<think>", "\n", "Hmm", ".", "\n", "</think>", "\n\n", "Four", "."]  # the model opens the thought
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{# <think> #}")  # fmt: skip
GPT_OSS_CALL_TOKENS = ["<|channel|>", "analysis", "<|message|>", "Call", " it", ".", "<|end|>", "<|start|>",
                       "assistant", "<|channel|>", "commentary", " to", "=functions.get_weather", " <|constrain|>",
                       "json", "<|message|>", '{"location": "Paris"}']  # fmt: skip


def reasoning_usage(script, template, stream: bool, **kwargs):
    engine = ScriptedEngine("GptOssForCausalLM" if template is None else "Qwen2ForCausalLM", [script])
    test_client, oai = client_for(engine, template)
    with test_client:
        request = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}], **kwargs}
        if not stream:
            return oai.chat.completions.create(**request).usage
        usage = None
        for chunk in oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request):
            usage = chunk.usage or usage
        return usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("script", "template", "expected"),
    [(R1_TOKENS, R1_TEMPLATE, 8), (R1_SPLIT_TAG, R1_TEMPLATE, 7), (QWEN3_TOKENS, QWEN3_TEMPLATE, 6),
     (GPT_OSS_FINAL_TOKENS, None, 9), (["No", " thought", " here", "."], QWEN3_TEMPLATE, 0)],
    ids=["r1", "r1-split-tag", "opens-think", "harmony", "no-thought"],
)  # fmt: skip
def test_reasoning_tokens_are_the_tokens_through_the_closing_tag(script, template, expected, stream):
    """One token per delta: the reasoning tokens are the tokens up to and including `</think>` (or the analysis
    message's `<|end|>`), never re-encoded text; the answer's tokens are not counted."""
    usage = reasoning_usage(script, template and ChatTemplate(template), stream)
    assert usage.completion_tokens == len(script)
    assert usage.completion_tokens_details.reasoning_tokens == expected


def test_harmony_tool_call_reasoning_tokens():
    usage = reasoning_usage(GPT_OSS_CALL_TOKENS, None, False, tools=[WEATHER_TOOL])
    assert (usage.completion_tokens_details.reasoning_tokens, usage.completion_tokens) == (7, len(GPT_OSS_CALL_TOKENS))


@settings(max_examples=60, deadline=None)
@given(script=st.sampled_from([R1_TOKENS, R1_SPLIT_TAG, GPT_OSS_FINAL_TOKENS, GPT_OSS_CALL_TOKENS]),
       cuts=st.lists(st.integers(1, 19), max_size=8), stream=st.booleans())  # fmt: skip
def test_reasoning_tokens_never_exceed_completion_tokens(script, cuts, stream):
    """Tokens grouped into deltas of several tokens each (as a held-back stop string or partial character makes
    them): reasoning_tokens stays within completion_tokens, and at least the whole thought is counted."""
    bounds = sorted({c for c in cuts if c < len(script)})
    pieces = ["".join(script[a:b]) for a, b in zip([0, *bounds], [*bounds, len(script)])]
    sizes = [b - a for a, b in zip([0, *bounds], [*bounds, len(script)])]
    engine = GroupedEngine(pieces, sizes)
    template = None if script[0] == "<|channel|>" else ChatTemplate(R1_TEMPLATE)
    engine.model_info = ModelInfo("scripted", 4096, "Qwen2ForCausalLM" if template else "GptOssForCausalLM")
    test_client, oai = client_for(engine, template)
    with test_client:
        request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        if stream:
            request["stream_options"] = {"include_usage": True}
            usage = [c.usage for c in oai.chat.completions.create(**request) if c.usage][-1]
        else:
            usage = oai.chat.completions.create(**request).usage
    assert usage.completion_tokens == len(script)
    closing = script.index(">" if script is R1_SPLIT_TAG else "</think>" if template else "<|end|>") + 1
    assert closing <= usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens


class GroupedEngine(ScriptedEngine):
    """Emits the given pieces, each Delta carrying `sizes[k]` token ids."""

    def __init__(self, pieces: list[str], sizes: list[int]):
        super().__init__("Qwen2ForCausalLM", [])
        self.pieces, self.sizes = pieces, sizes

    async def generate(self, prompt_ids, params, request_id):
        for k, (piece, size) in enumerate(zip(self.pieces, self.sizes)):
            await asyncio.sleep(0)
            last = k == len(self.pieces) - 1
            yield Delta(request_id, [1] * size, piece, None, last, "stop" if last else None, len(prompt_ids), 0, k + 1)


GARBLED = [("<|channel|>fnal<|message|>Paris.", None, "Paris."),
           ("no markup at all", None, "no markup at all"),
           ("<|channel|>final Paris.<|end|>", None, "Paris."),
           ("final<|message|>Header without channel.", None, "Header without channel."),
           ("<|channel|>analysis<|message|>Hmm<|end|><|start|>assistant<|channel|>fi", "Hmm", "fi"),
           ('<|channel|>commentary to=functions.get_weather json{"location": "Oslo"}', None, None)]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_garbled_harmony_output_is_still_a_200(stream):
    """gpt-oss sampled at temperature 1 may garble its channel markup: each answer still comes back, as content,
    reasoning or a tool call."""
    engine = ScriptedEngine("GptOssForCausalLM", [text for text, _, _ in GARBLED], seed=3)
    test_client, oai = client_for(engine)
    with test_client:
        for text, reasoning, content in GARBLED:
            kwargs = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
            if stream:
                got_reasoning, got_content, calls = "", "", []
                for chunk in oai.chat.completions.create(stream=True, **kwargs):
                    for c in chunk.choices:
                        got_reasoning += getattr(c.delta, "reasoning_content", None) or ""
                        got_content += c.delta.content or ""
                        calls += c.delta.tool_calls or []
            else:
                message = oai.chat.completions.create(**kwargs).choices[0].message
                got_reasoning, got_content = message.reasoning_content or "", message.content or ""
                calls = message.tool_calls or []
            assert (got_reasoning or None, got_content or None) == (reasoning, content), text
            if content is None:
                assert calls[0].function.name == "get_weather"
                assert json.loads(calls[0].function.arguments) == {"location": "Oslo"}
