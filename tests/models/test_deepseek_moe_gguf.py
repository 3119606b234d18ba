"""benchmarks/deepseek_moe.py's deepseek2 writer at a tiny shape: Hearth loads it, and with unambiguous routing its
first-step and decode-step logits correlate with llama.cpp's (when llama-cpp-python and its library are present)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from gguf import GGUFReader
from test_r1_distill_gguf import import_llama_cpp

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks")


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, BENCHMARKS)  # the script imports its sibling r1_distill_gguf
    try:
        spec = importlib.util.spec_from_file_location("deepseek_moe", os.path.join(BENCHMARKS, "deepseek_moe.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCHMARKS)
    return module


@pytest.fixture(scope="module")
def tiny_gguf(script, tmp_path_factory):
    """Two layers (one dense, one MoE of 8 experts, 2 per token, 1 shared), Q8_0, the favoured experts' correction
    bias +8 (unambiguous routing)."""
    shape = script.DeepseekShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=32,
                                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn=96, num_experts=8,
                                 num_shared_experts=1, experts_per_token=2, expert_ffn=32, vocab_size=512,
                                 context_length=512, original_context_length=64)  # fmt: skip
    path = str(tmp_path_factory.mktemp("ds-gguf") / "tiny-deepseek2.gguf")
    script.write_random_gguf(path, shape, "Q8_0", seed=1, unambiguous_routing=True)
    return path


def test_small_depth_says_no_q_lora(tiny_gguf):
    from hearth.loader.inspect import read_gguf_config

    fields = GGUFReader(tiny_gguf).fields
    assert int(fields["deepseek2.attention.q_lora_rank"].parts[-1][0]) == 0  # llama.cpp reads it at this depth
    config = read_gguf_config(tiny_gguf)
    assert config.q_lora_rank is None and config.num_local_experts == 8 and config.kv_lora_rank == 32


def test_logits_correlate_with_llama_cpp(script, tiny_gguf):
    import_llama_cpp()
    threads = torch.get_num_threads()
    try:
        record = script.check_logits(tiny_gguf, prompt_len=12, threads=1)
    finally:
        torch.set_num_threads(threads)
    for step in ("first_step", "decode_step"):
        assert record[step]["correlation"] >= 0.99, record


def test_q8_0_weights_are_read_in_place_and_compute_what_repacked_ones_do(tiny_gguf, monkeypatch):
    """A Q8_0 file's projections and experts are read where they lie in the file's map (nothing copied at load, none
    of their pages unmapped), and greedy generation with logprobs is the same, bit for bit, as with every weight
    repacked."""
    from hearth import LLM
    from hearth.kernels import gguf_cpu
    from hearth.layers.linear import Linear
    from hearth.loader.gguf import open_gguf
    from hearth.sampling_params import SamplingParams

    if not gguf_cpu.available():
        pytest.skip("no C compiler for the GGUF kernels")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    prompts = [[5, 17, 300, 41, 9, 77, 2, 150], [400, 3, 3, 8]]

    def run():
        llm = LLM(tiny_gguf, block_size=4, max_model_len=64, max_num_seqs=2)
        model = llm.engine.runner.model
        outs = llm.generate(prompts, params)
        held = {n: m.blocks for n, m in model.named_modules() if isinstance(m, Linear) and m.blocks is not None}
        return outs, held

    outs, held = run()
    assert held and all(w.raw and not w.qs.numel() for w in held.values())
    gguf_file = open_gguf(tiny_gguf)  # the same (cached) map the load used
    # views of the file's map, not copies; except where the loader reorders rope rows (then it reads that copy)
    parts = [p for n, w in held.items() if not n.endswith(("q_proj", "kv_a_proj_with_mqa")) for p in w.raw]
    assert len(parts) >= 30 and len(gguf_file.mapped_ranges(parts, own_bytes=True)) == len(parts)
    monkeypatch.setattr(gguf_cpu, "can_read_in_place", lambda parts, k: False)
    repacked_outs, repacked = run()
    assert repacked.keys() == held.keys() and all(not w.raw and w.qs.numel() for w in repacked.values())
    for a, b in zip(outs, repacked_outs):
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]


def test_latent_weights_stay_in_the_file(tiny_gguf, monkeypatch):
    """attn_k_b / attn_v_b (Q8_0) are held as views of the file's map, not bf16 copies: decode's MLA kernel reads them
    there, prefill dequantizes them per step. Greedy decoding with logprobs matches the torch absorbed form on their
    bf16 dequantization (which rounds each weight to bf16, hence a tolerance)."""
    from hearth import LLM
    from hearth.kernels import attention_cpu, gguf_cpu
    from hearth.loader.gguf import open_gguf
    from hearth.models.deepseek_v3 import DeepseekV3Attention
    from hearth.sampling_params import SamplingParams

    if not (gguf_cpu.available() and attention_cpu.available()):
        pytest.skip("no C compiler for the kernels")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = [[5, 17, 300, 41, 9, 77, 2, 150], [400, 3, 3, 8]]
    llm = LLM(tiny_gguf, block_size=4, max_model_len=64, max_num_seqs=2)
    attns = [m for m in llm.engine.runner.model.modules() if isinstance(m, DeepseekV3Attention)]
    assert len(attns) == 2 and all(isinstance(a.w_uk_t, gguf_cpu.R16Weight) for a in attns)
    parts = [p for a in attns for w in (a.w_uk_t, a.w_uv) for p in w.raw]
    assert len(open_gguf(tiny_gguf).mapped_ranges(parts, own_bytes=True)) == len(parts)  # views of the map
    assert all(a.kv_b_proj.method is None for a in attns)  # no dense kv_b held either
    outs = llm.generate(prompts, params)
    del llm
    monkeypatch.setattr(attention_cpu, "can_mla_decode", lambda *args: False)  # decode in the torch absorbed form
    torch_outs = LLM(tiny_gguf, block_size=4, max_model_len=64, max_num_seqs=2).generate(prompts, params)
    for a, b in zip(outs, torch_outs):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) <= 0.02


def test_stacked_experts_are_unmapped_as_each_expert_is_repacked(tiny_gguf, monkeypatch):
    """The file pages of a layer's stacked experts (one tensor per kind, split among the experts' Linears) are
    unmapped expert by expert, each Linear's own rows once it is finalized, and what is left of the stacked tensors
    once the layer's experts are done, not at the end of the load: the load's peak stays near the loaded model's
    size."""
    from hearth.kernels import gguf_cpu
    from hearth.loader import load
    from hearth.loader.gguf import GGUFFile
    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.resolve import ModelRef
    from hearth.models.deepseek_v3 import DeepseekV3Experts
    from hearth.models.registry import model_class

    if not gguf_cpu.available():
        pytest.skip("no C compiler for the GGUF kernels")
    monkeypatch.setattr(gguf_cpu, "can_read_in_place", lambda parts, k: False)  # Q8_0 is read in place otherwise
    calls = []
    release, gguf_release = load._release, GGUFFile.release

    def spy_release(f, module, tensors, keep=None):
        calls.append(("module", module, f.mapped_ranges(t for x in tensors for t in load._tensors(x))))
        return release(f, module, tensors, keep)

    def spy_gguf_release(self, ranges, keep=()):
        calls.append(("ranges", None, list(ranges)))
        return gguf_release(self, ranges, keep)

    monkeypatch.setattr(load, "_release", spy_release)
    monkeypatch.setattr(GGUFFile, "release", spy_gguf_release)
    config = read_gguf_config(tiny_gguf)
    model = model_class(config)(config)
    load.load_model(model, ModelRef(tiny_gguf, tiny_gguf, "gguf"), torch.bfloat16, keep_quantized=True)
    experts = [i for i, (kind, module, _) in enumerate(calls) if kind == "module" and isinstance(module, DeepseekV3Experts)]
    assert len(experts) == 1 and len(calls[experts[0]][2]) == 3  # gate, up and down, stacked
    final = [i for i, (kind, module, _) in enumerate(calls) if kind == "module" and module is model]
    assert final and experts[0] < final[-1]
    assert not any(r in calls[experts[0]][2] for r in calls[final[-1]][2])  # none left for the final sweep
    stacked = calls[experts[0]][2]

    def inside(p, a, b):  # strictly within one of the stacked tensors
        return any(p == q and s <= a and b <= e and (a, b) != (s, e) for q, s, e in stacked)

    own = [ranges for kind, _, ranges in calls[: experts[0]] if kind == "ranges" and all(inside(*r) for r in ranges)]
    assert sorted(len(r) for r in own) == [1] * 8 + [2] * 8  # each expert's down rows, then its gate and up rows
