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
