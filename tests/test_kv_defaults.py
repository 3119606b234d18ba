"""Defaults that work for every model size: max_model_len and the KV pool are planned from the memory budget (never
from the context a file declares) with the same block count the engine checks, and every check that can fail runs
before a weight is read."""

from __future__ import annotations

import pytest
from gguf_models import gpt_oss_spec, llama_spec, write_model  # tests/gguf_models.py
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.config import (
    DEFAULT_MAX_MODEL_LEN,
    EngineConfig,
    KVGroup,
    LayerKV,
    ModelConfig,
    kv_blocks_needed,
    kv_spec,  # fmt: skip
    plan_kv_cache,
)
from hearth.planner.cards import load_card

GIB = 1 << 30


def gpt_oss_20b() -> ModelConfig:
    return load_card("gpt-oss-20b").config


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite's published shape: MLA (kv_lora_rank 512, rope 64), 27 layers, a 163840-token context."""
    return ModelConfig(model_type="deepseek_v3", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                       num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                       max_position_embeddings=163840, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                       v_head_dim=128, num_local_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408)  # fmt: skip


def test_gpt_oss_block_count_by_hand():
    spec = kv_spec(gpt_oss_20b())
    assert [g.sliding_window for g in spec.groups] == [None, 128]
    # full group: 2048 / 16 = 128 blocks; sliding group: (128 + 512) / 16 + 1 = 41 blocks
    assert kv_blocks_needed(spec, 2048, 16, 512) == 128 + 41
    # a sequence shorter than window + chunk holds no more than itself (+1 straddled block)
    assert kv_blocks_needed(spec, 200, 16, 512) == 13 + 14
    # more sequences: every one holds its tokens or its window; one step's chunk on top
    assert kv_blocks_needed(spec, 2048, 16, 512, num_seqs=3) == 3 * 128 + 41 + 2 * (8 + 1)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(window=st.integers(1, 4096), chunk=st.integers(1, 4096), block_size=st.sampled_from([1, 4, 16, 32]),
       length=st.integers(1, 1 << 17), seqs=st.integers(1, 64), context=st.integers(1, 1 << 20),
       free=st.integers(0, 64 * GIB), explicit=st.booleans())  # fmt: skip
def test_default_pool_holds_what_the_check_needs(window, chunk, block_size, length, seqs, context, free, explicit):
    """gpt-oss-like layout (alternating window / full layers): whatever the plan returns, one max_model_len sequence
    fits its pool by the check's own count, including max_num_seqs=1 (what `hearth bench` runs)."""
    layers = tuple(LayerKV(8, 64, 64, sliding_window=window if i % 2 == 0 else None) for i in range(4))
    spec = type(kv_spec(gpt_oss_20b()))(layers)
    config = EngineConfig(max_model_len=length if explicit else None, max_num_seqs=seqs, max_num_batched_tokens=chunk,
                          block_size=block_size)  # fmt: skip
    try:
        plan = plan_kv_cache(spec, config, context, free)
    except ValueError as e:
        assert "\n" not in str(e) and "--kv-cache-memory" in str(e)
        need = kv_blocks_needed(spec, min(length, context) if explicit else min(context, 512), block_size, chunk)
        assert need * spec.block_bytes(block_size) > free // 4  # it really does not fit
        return
    assert kv_blocks_needed(spec, plan.max_model_len, block_size, chunk) <= plan.num_blocks
    assert plan.num_blocks * plan.block_bytes <= free // 4
    assert plan.max_model_len <= (min(length, context) if explicit else min(context, DEFAULT_MAX_MODEL_LEN))
    if seqs == 1 and not explicit:  # the default pool is exactly what one sequence needs
        assert plan.num_blocks == kv_blocks_needed(spec, plan.max_model_len, block_size, chunk)


def test_gpt_oss_20b_on_a_24_gib_machine():
    """The reported case: 13.8 GB of weights, ~22 GiB available: 131072 in the file, 8192 by default, and the
    budget/check agree for serve (16 sequences) and bench (one sequence, a 2048 context)."""
    spec, free = kv_spec(gpt_oss_20b()), int(22 * GIB - 13.8e9)
    serve = plan_kv_cache(spec, EngineConfig(), 131072, free)
    assert serve.max_model_len == 8192 and "131072" in serve.note
    assert kv_blocks_needed(spec, 8192, 16, 512) <= serve.num_blocks <= (free // 4) // serve.block_bytes
    bench = plan_kv_cache(spec, EngineConfig(max_model_len=2048, max_num_seqs=1), 131072, free)
    assert bench.num_blocks == kv_blocks_needed(spec, 2048, 16, 512) == 169
    with pytest.raises(ValueError) as info:
        plan_kv_cache(spec, EngineConfig(max_model_len=131072), 131072, free)
    message = str(info.value)
    assert "\n" not in message and "--max-model-len" in message and "--kv-cache-memory" in message
    assert f"{free // 4 / GIB:.2f} GiB" in message and "at most" in message


def test_deepseek_v2_lite_context_is_capped():
    spec = kv_spec(deepseek_v2_lite())
    plan = plan_kv_cache(spec, EngineConfig(), 163840, 10 * GIB)
    assert plan.max_model_len == 8192


def test_a_small_budget_lowers_the_default_context():
    spec = kv_spec(gpt_oss_20b())
    block_bytes = spec.block_bytes(16)
    free = 4 * 300 * block_bytes  # a quarter of it holds 300 blocks: 300 - 41 sliding = 259 full blocks
    plan = plan_kv_cache(spec, EngineConfig(), 131072, free)
    assert plan.max_model_len == 259 * 16 and "lowered" in plan.note
    assert kv_blocks_needed(spec, plan.max_model_len, 16, 512) <= plan.num_blocks <= 300
    with pytest.raises(ValueError, match="too few for even a 512-token context"):
        plan_kv_cache(spec, EngineConfig(), 131072, 4 * 40 * block_bytes)
    with pytest.raises(ValueError, match="more than the .* free after the weights"):
        plan_kv_cache(spec, EngineConfig(kv_cache_memory="64GiB"), 131072, 8 * GIB)


def test_kv_groups_are_what_the_count_walks():
    spec = kv_spec(deepseek_v2_lite())
    assert spec.groups == (KVGroup(None, tuple(range(27))),)
    assert kv_blocks_needed(spec, 100, 16, 512, num_seqs=2) == 2 * 7


@pytest.fixture
def no_weights_read(monkeypatch):
    """Any attempt to build the model or read a weight fails the test: the checks must come first."""
    from hearth.engine import model_runner

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built or its weights read before the checks")

    monkeypatch.setattr(model_runner, "load_model", forbidden)
    monkeypatch.setattr(model_runner, "model_class", forbidden)
    return model_runner


def test_kv_error_comes_before_any_weight_is_read(tmp_path, no_weights_read, monkeypatch):
    from hearth.llm import LLM

    arch, kvs, tensors = gpt_oss_spec()
    path = tmp_path / "gpt-oss.gguf"
    write_model(path, arch, kvs, tensors)
    monkeypatch.setattr(no_weights_read, "available_memory", lambda device: 64 << 20)
    with pytest.raises(ValueError, match="max_model_len=131072 needs .* lower --max-model-len"):
        LLM(str(path), dtype="float32", max_model_len=1 << 20)
    with pytest.raises(ValueError, match="the weights need about .* GiB"):
        monkeypatch.setattr(no_weights_read, "available_memory", lambda device: 1000)
        LLM(str(path), dtype="float32")


def test_defaults_load_and_generate_for_gpt_oss_with_one_sequence(tmp_path):
    """`hearth bench`'s engine settings (one sequence, a 2048 context, 512-token chunks) on a sliding-window model,
    and the defaults, which cap the file's 131072 at 8192."""
    from hearth.llm import LLM
    from hearth.sampling_params import SamplingParams

    arch, kvs, tensors = gpt_oss_spec()
    path = tmp_path / "gpt-oss.gguf"
    write_model(path, arch, kvs, tensors)
    bench = LLM(str(path), dtype="float32", max_model_len=2048, max_num_seqs=1, enable_prefix_caching=False)
    out = bench.generate([list(range(2, 40))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    assert bench.engine.runner.num_kvcache_blocks == kv_blocks_needed(kv_spec(bench.engine.model_config), 2048, 16, 512)
    default = LLM(str(path), dtype="float32")
    assert default.engine.max_model_len == 8192


def test_llama_default_is_the_file_context_when_small(tmp_path):
    from hearth.llm import LLM

    arch, kvs, tensors = llama_spec()
    path = tmp_path / "llama.gguf"
    write_model(path, arch, kvs, tensors)
    assert LLM(str(path), dtype="float32").engine.max_model_len == 256
    assert LLM(str(path), dtype="float32", max_model_len=100).engine.max_model_len == 100


def write_sparse_gpt_oss_20b(path) -> int:
    """gpt-oss-20b's real tensor table (MXFP4 experts, the rest bf16: 13.8 GB) over a data section that is a hole in a
    sparse file: metadata and shapes are real, no weight byte is ever written or read. Returns the file size."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V
    from gguf import GGUFWriter

    cfg = gpt_oss_20b()
    hidden, heads, kv, hd, ff, e = 2880, 64, 8, 64, 2880, 32
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (hidden, heads, kv, hd)
    writer = GGUFWriter(str(path), "gpt-oss")
    a = "gpt-oss"
    kvs = [(f"{a}.block_count", 24, V.UINT32), (f"{a}.context_length", 131072, V.UINT32),
           (f"{a}.embedding_length", hidden, V.UINT32), (f"{a}.feed_forward_length", ff, V.UINT32),
           (f"{a}.expert_feed_forward_length", ff, V.UINT32), (f"{a}.attention.head_count", heads, V.UINT32),
           (f"{a}.attention.head_count_kv", kv, V.UINT32), (f"{a}.attention.key_length", hd, V.UINT32),
           (f"{a}.attention.sliding_window", 128, V.UINT32), (f"{a}.expert_count", e, V.UINT32),
           (f"{a}.expert_used_count", 4, V.UINT32), (f"{a}.rope.freq_base", 150000.0, V.FLOAT32),
           (f"{a}.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32), (f"{a}.vocab_size", cfg.vocab_size, V.UINT32),
           ("tokenizer.ggml.model", "gpt2", V.STRING)]  # fmt: skip
    for key, value, vtype in kvs:
        writer.add_key_value(key, value, vtype)
    writer.add_key_value("tokenizer.ggml.tokens", ["a", "b", "c"], V.ARRAY, sub_type=V.STRING)

    def add(name: str, shape: tuple[int, ...], qtype=T.BF16) -> None:
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        nbytes = rows * cols // 32 * 17 if qtype == T.MXFP4 else rows * cols * (4 if qtype == T.F32 else 2)
        writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)

    add("token_embd.weight", (cfg.vocab_size, hidden))
    add("output_norm.weight", (hidden,), T.F32)
    add("output.weight", (cfg.vocab_size, hidden))
    for i in range(24):
        b = f"blk.{i}."
        for name, shape in {"attn_norm.weight": (hidden,), "post_attention_norm.weight": (hidden,),
                            "attn_q.bias": (heads * hd,), "attn_k.bias": (kv * hd,), "attn_v.bias": (kv * hd,),
                            "attn_output.bias": (hidden,), "attn_sinks.weight": (heads,), "ffn_gate_inp.bias": (e,),
                            "ffn_gate_exps.bias": (e, ff), "ffn_up_exps.bias": (e, ff),
                            "ffn_down_exps.bias": (e, hidden)}.items():  # fmt: skip
            add(b + name, shape, T.F32)
        for name, shape in {"attn_q.weight": (heads * hd, hidden), "attn_k.weight": (kv * hd, hidden),
                            "attn_v.weight": (kv * hd, hidden), "attn_output.weight": (hidden, heads * hd),
                            "ffn_gate_inp.weight": (e, hidden)}.items():  # fmt: skip
            add(b + name, shape)
        for name, shape in {"ffn_gate_exps.weight": (e, ff, hidden), "ffn_up_exps.weight": (e, ff, hidden),
                            "ffn_down_exps.weight": (e, hidden, ff)}.items():  # fmt: skip
            add(b + name, shape, T.MXFP4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    from hearth.loader.gguf import open_gguf

    with open(path, "r+b") as f:  # the data section: a hole of the right size
        f.truncate(f.seek(0, 2) + sum(-(-t.nbytes // 32) * 32 for t in writer.tensors[0].values()) + 64)
    return max(t.offset + t.nbytes for t in open_gguf(path, check_types=False).tensor_infos)


def test_real_shaped_gpt_oss_20b_plans_before_loading(tmp_path, no_weights_read, monkeypatch):
    """The 13.8 GB file on a 24 GiB machine (about 22 GiB available): defaults give 8192 tokens for serve and bench's
    settings fit; an explicit --max-model-len 131072 is a one-line error naming the budget, before any weight."""
    import torch

    from hearth.config import EngineConfig as EC
    from hearth.llm import LLM
    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.resolve import resolve_model

    path = tmp_path / "gpt-oss-20b.gguf"
    end = write_sparse_gpt_oss_20b(path)
    assert end > 13e9 and path.stat().st_blocks * 512 < 64 << 20  # real size, nothing on disk
    ref = resolve_model(str(path))
    cfg = read_gguf_config(str(path))  # the whole table is checked against the config
    available = 22 * GIB
    plan = no_weights_read.plan_memory(ref, cfg, EC(), torch.bfloat16, True, available)
    assert plan.max_model_len == 8192 and 2.0 * GIB < plan.budget_bytes < 2.5 * GIB
    bench = no_weights_read.plan_memory(ref, cfg, EC(max_model_len=2048, max_num_seqs=1), torch.bfloat16, True,
                                        available)  # fmt: skip
    assert bench.num_blocks == kv_blocks_needed(kv_spec(cfg), 2048, 16, 512)
    run = no_weights_read.plan_memory(ref, cfg, EC(max_num_seqs=1), torch.bfloat16, True, available)
    assert run.max_model_len == 8192
    monkeypatch.setattr(no_weights_read, "available_memory", lambda device: available)
    with pytest.raises(ValueError) as info:
        LLM(str(path), max_model_len=131072)
    message = str(info.value)
    assert "\n" not in message and "max_model_len=131072" in message and "--max-model-len" in message
