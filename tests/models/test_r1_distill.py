"""DeepSeek-R1-Distill: tiny random Qwen2 / Llama checkpoints with the distills' shape ratios against transformers,
and R1's chat template (docs/models.md §2.6) rendered through hearth's ChatTemplate, tools included."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_biases, save_tiny
from test_models_vs_hf import prefill_logits

from hearth.chat.reasoning import ParsedDelta, ThinkParser
from hearth.chat.template import ChatTemplate
from hearth.chat.tool_calls import DeepSeekV3ToolParser
from hearth.sampling_params import SamplingParams

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# An R1-style template written for these tests from the description in docs/models.md §2.6: system prompts first with no
# role tag (tool definitions appended to them), <｜User｜>/<｜Assistant｜> turns, past thoughts dropped (only the text
# after the last </think> is kept), DeepSeek's tool-call and tool-output tokens, and a generation prompt that opens
# the thought.
R1_TEMPLATE = (
    "{%- set ns = namespace(system='', in_outputs=false) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + '## Tools\nYou can call these functions:' -%}"
    "{%- for tool in tools -%}{%- set ns.system = ns.system + '\n' + (tool['function'] | tojson) -%}{%- endfor -%}"
    "{%- endif -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- if not ns.in_outputs -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- set ns.in_outputs = true -%}{%- endif -%}"
    "{{- '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}"
    "{%- elif m['role'] != 'system' -%}"
    "{%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- set ns.in_outputs = false -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<｜User｜>' + m['content'] -}}"
    "{%- else -%}"
    "{{- '<｜Assistant｜>' + (m.get('content') or '').split('</think>')[-1] -}}"
    "{%- if m.get('tool_calls') -%}"
    "{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for call in m['tool_calls'] -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "{{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + '\n```json\n' -}}"
    "{{- (args if args is string else args | tojson) + '\n```<｜tool▁call▁end｜>' -}}"
    "{%- endfor -%}"
    "{{- '<｜tool▁calls▁end｜>' -}}"
    "{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\n' -}}{%- endif -%}"
)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them</think>\n\n4"},
    {"role": "user", "content": "Weather in Zürich and Bern?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 19}'},
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def test_r1_template_renders_turns_thoughts_and_tools():
    template = ChatTemplate(R1_TEMPLATE, BOS, EOS)
    text = template.render(CONVERSATION, add_generation_prompt=True, tools=[WEATHER_TOOL])
    call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{}\n```<｜tool▁call▁end｜>"
    expected = (
        BOS + "You are terse.\n\n## Tools\nYou can call these functions:\n" + json.dumps(WEATHER_TOOL["function"],
                                                                                      ensure_ascii=False)
        + "<｜User｜>What is 2+2?<｜Assistant｜>\n\n4" + EOS
        + "<｜User｜>Weather in Zürich and Bern?<｜Assistant｜><｜tool▁calls▁begin｜>"
        + call.format('{"city": "Zürich"}') + call.format('{"city": "Bern"}') + "<｜tool▁calls▁end｜>" + EOS
        + '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜>'
        + '<｜tool▁output▁begin｜>{"temp": 19}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>'
        + "<｜Assistant｜><think>\n"
    )  # fmt: skip
    assert text == expected
    assert "add them" not in text  # past reasoning is dropped
    # the template's tool-call rendering is what the DeepSeek tool parser reads back
    segment = text[text.index("<｜tool▁calls▁begin｜>") : text.index("<｜tool▁calls▁end｜>") + 20]
    parser = DeepSeekV3ToolParser()
    parsed = parser.feed(segment).extend(parser.finish())
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Bern"})]  # fmt: skip
    assert template.render(CONVERSATION[:2], add_generation_prompt=False) == (
        BOS + "You are terse.<｜User｜>What is 2+2?")  # fmt: skip


def build_distill(kind: str, folder: str):
    """R1-Distill-Qwen-1.5B's ratios (12 heads over 2 kv heads, intermediate = 35/6 hidden, untied, eps 1e-6,
    theta 1e4) or R1-Distill-Llama-8B's (32/8 heads, 3.5×, llama3 rope scaling, theta 5e5), at hidden 96 / 128."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":
        config = Qwen2Config(hidden_size=96, intermediate_size=560, num_hidden_layers=2, num_attention_heads=12,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-6,
                             rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
        model = Qwen2ForCausalLM(config).eval()
        randomize_biases(model)
    else:
        config = LlamaConfig(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
                             tie_word_embeddings=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})  # fmt: skip
        model = LlamaForCausalLM(config).eval()
    save_tiny(model, folder)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = R1_TEMPLATE
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_distill_shapes_match_transformers(kind, tmp_path):
    from hearth import LLM

    hf = build_distill(kind, str(tmp_path))
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_model_len=128)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm.engine.runner.model, ids), theirs, atol=1e-4, rtol=1e-4)

    # chat through the model's own (R1) template, then split the output the way the server does
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    bos = llm.tokenizer.bos_token or ""  # Llama configs name bos id 1, a byte here
    assert llm.tokenizer.decode(out.prompt_token_ids) == bos + "<｜User｜>hi<｜Assistant｜><think>\n"
    full = torch.tensor(out.prompt_token_ids + out.token_ids)
    with torch.inference_mode():
        ref = hf(full[None]).logits[0, len(out.prompt_token_ids) - 1 : -1].argmax(-1)
    assert out.token_ids == ref.tolist()
    parser = ThinkParser(starts_in_reasoning=True)
    parsed = parser.feed(out.text).extend(parser.finish())
    assert isinstance(parsed, ParsedDelta) and "</think>" not in parsed.reasoning
