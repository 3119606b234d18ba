"""DeepSeek-V3 under tensor parallel (gloo, 2 processes on this machine): tp=2 computes what tp=1 does.

Tiny random checkpoints as test_deepseek_v3.py builds them (MLA with q_lora or q_proj, YaRN, grouped sigmoid routing
with a correction bias, a shared expert, a dense first layer): HF float32, DeepSeek's FP8 128×128 blocks, and GGUF
`deepseek2` with Q8_0 experts and split attn_k_b / attn_v_b. Each engine at tp=2 is rank 0 in the test process and
spawns rank 1; the tests compare every step's sampled logits (within 1e-5 in float32) and the greedy continuations
through continuous batching (prompts arriving while others decode, prefill chunks, a shared prefix), with the routed
experts split by their intermediate dim and with expert parallel, and measure rank 0's resident weights.
"""

from __future__ import annotations

import pytest
import torch
from test_deepseek_v3 import build_hf, write_deepseek2_gguf, write_fp8_checkpoint

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine, read_model_config
from hearth.loader import ModelLoadError
from hearth.loader.load import model_nbytes
from hearth.loader.resolve import ModelRef, resolve_model
from hearth.planner.hardware import get_hardware
from hearth.planner.plan import plan
from hearth.sampling_params import SamplingParams
from hearth.tokenizer import load_tokenizer

SHARED = list(range(3, 40))  # two full blocks of 16 shared by two prompts: a prefix-cache hit
PROMPTS = [SHARED + [7, 8], [5, 9, 200, 17, 3], list(range(40, 90)), SHARED + [100, 101, 102], [250] * 20]


def run_engine(ref, tp: int, expert_parallel: bool = False, tokenizer=None) -> dict:
    """Greedy continuations of PROMPTS, arriving two at a time while earlier ones decode (32-token steps, so the
    50-token prompt prefills in two chunks beside decode rows; the fourth prompt finds the first's two blocks in the
    prefix cache), with every step's sampled logits (rank 0), rank 0's resident weight bytes and its KV-cache bytes
    per block."""
    engine = LLMEngine(ref, EngineConfig(dtype="float32", max_model_len=128, max_num_batched_tokens=32,
                                         tensor_parallel_size=tp, enable_expert_parallel=expert_parallel),
                       tokenizer=tokenizer)  # fmt: skip
    try:
        logits, sample = [], engine.runner.sampler

        def sampler(step_logits, seqs, generators):
            logits.append((tuple(s.request_id for s in seqs), step_logits.float().clone()))
            return sample(step_logits, seqs, generators)

        engine.runner.sampler = sampler
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tokens: dict = {}
        pending, seqs = list(enumerate(PROMPTS)), []
        while pending or engine.has_unfinished():
            for _ in range(min(len(pending), 2)):
                i, p = pending.pop(0)
                seqs.append(engine.add_request(p, params, f"r{i}"))
            for delta in engine.step():
                tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        caches = [m.kv_cache for m in engine.runner.model.modules() if getattr(m, "kv_cache", None) is not None]
        return {"logits": logits, "tokens": tokens, "bytes": model_nbytes(engine.runner.model),
                "kv_block": sum(c.nbytes // c.shape[0] for c in caches),
                "cached": [s.num_cached_tokens for s in seqs]}  # fmt: skip
    finally:
        engine.close()


def assert_same(one: dict, two: dict, tol: float = 1e-5) -> float:
    """Same greedy tokens, the same steps with logits within `tol`; returns the largest logit difference."""
    assert two["tokens"] == one["tokens"]
    assert len(two["logits"]) == len(one["logits"])
    worst = 0.0
    for (ids1, a), (ids2, b) in zip(one["logits"], two["logits"], strict=True):
        assert ids1 == ids2 and a.shape == b.shape
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def tiny_deepseek_tp(tmp_path_factory):
    """build_hf's tiny V3: 4 heads (2 per rank), q_lora, 8 experts in 4 groups (top-2 of 2 groups), one shared
    expert, layer 0 dense; the correction bias random so that it changes the choice."""
    from conftest import save_tiny

    hf = build_hf(seed=11)
    return save_tiny(hf, str(tmp_path_factory.mktemp("tiny-deepseek-tp")))


def test_tp2_equals_tp1_with_and_without_expert_parallel(tiny_deepseek_tp):
    """tp=2 with the routed experts split by intermediate dim, and with expert parallel (4 whole experts per rank):
    logits within 1e-5 and identical greedy continuations. Rank 0 holds about half the weights (q_a / kv_a and the
    norms replicated; measured 0.53 both ways) and the whole latent cache per block, which the
    planner's per-device KV figure says too."""
    ref = resolve_model(tiny_deepseek_tp)
    one = run_engine(ref, 1)
    split = run_engine(ref, 2)
    ep = run_engine(ref, 2, expert_parallel=True)
    assert one["cached"] == [0, 0, 0, 32, 0]  # the prefix hit
    seen, mixed = set(), 0
    for ids, _ in one["logits"]:  # a step that sampled a prompt's first token beside decode rows
        mixed += bool(set(ids) - seen) and bool(set(ids) & seen)
        seen |= set(ids)
    assert mixed >= 2
    assert_same(one, split)
    assert_same(one, ep)
    for two in (split, ep):
        assert 0.45 <= two["bytes"] / one["bytes"] <= 0.6, (one["bytes"], two["bytes"])
        assert two["kv_block"] == one["kv_block"]  # the latent cache is not divided
    per_device = plan(read_model_config(ref), get_hardware("auto", 2)).kv_bytes_per_token_per_device
    assert split["kv_block"] == per_device * EngineConfig().block_size * 2  # the planner's figure is bf16, this float32
    assert not torch.distributed.is_initialized()


def test_rank_1_keeps_its_shard_and_reads_no_other_ranks_expert(tiny_deepseek_tp, monkeypatch):
    """Rank 1 of 2 built and loaded in this process (no collective runs at load): its heads 2-3 of q_b / kv_b and
    their o_proj columns, replicated latent projections, the second half of each MLP's intermediate rows and of the
    vocabulary, and with expert parallel experts 4-7 whole; the safetensors reader never reads experts 0-3."""
    from safetensors import safe_open

    from hearth.layers.distributed import set_tensor_parallel
    from hearth.loader import safetensors as st
    from hearth.loader.inspect import read_hf_config
    from hearth.loader.load import load_model
    from hearth.models.deepseek_v3 import DeepseekV3ForCausalLM, RemoteExpert

    read: list[str] = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(st, "safe_open", Recording)
    with safe_open(f"{tiny_deepseek_tp}/model.safetensors", "pt") as f:
        hf = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    set_tensor_parallel(1, 2, expert_parallel=True)
    try:
        config = read_hf_config(tiny_deepseek_tp)
        model = DeepseekV3ForCausalLM(config)
        load_model(model, ModelRef(tiny_deepseek_tp, tiny_deepseek_tp, "hf"), torch.float32, keep_quantized=False)
    finally:
        set_tensor_parallel(0, 1)
    assert read and not [n for n in read if any(f".experts.{e}." in n for e in range(4))]
    layer, p = model.model.layers[1], "model.layers.1."
    attn = layer.self_attn
    assert attn.num_heads == 2 and attn.w_uk_t.shape == (2, 16, 16)
    assert torch.equal(attn.q_b_proj.weight, hf[p + "self_attn.q_b_proj.weight"][48:96])
    kv_b = hf[p + "self_attn.kv_b_proj.weight"][64:128].view(2, 32, -1)  # this rank's 2 heads of nope 16 + v 16
    assert torch.equal(attn.w_uk_t, kv_b[:, :16].transpose(1, 2)) and torch.equal(attn.w_uv, kv_b[:, 16:])
    assert torch.equal(attn.o_proj.weight, hf[p + "self_attn.o_proj.weight"][:, 32:64])
    assert attn.q_a_proj.weight.shape == hf[p + "self_attn.q_a_proj.weight"].shape  # replicated
    assert attn.kv_a_proj_with_mqa.weight.shape == hf[p + "self_attn.kv_a_proj_with_mqa.weight"].shape
    experts = layer.mlp.experts
    assert all(isinstance(experts[e], RemoteExpert) for e in range(4))
    gate, up = hf[p + "mlp.experts.5.gate_proj.weight"], hf[p + "mlp.experts.5.up_proj.weight"]
    assert torch.equal(experts[5].gate_up_proj.weight, torch.cat([gate, up]))
    shared = layer.mlp.shared_experts
    assert torch.equal(shared.down_proj.weight, hf[p + "mlp.shared_experts.down_proj.weight"][:, 16:32])
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"][128:256])
    dense = model.model.layers[0].mlp
    assert torch.equal(dense.gate_up_proj.weight[:64], hf["model.layers.0.mlp.gate_proj.weight"][64:128])


def fp8_hf(**overrides):
    """Dims whose head and intermediate splits over 2 ranks fall on 128-row / 128-column FP8 block edges: 8 heads of
    q 32 + 32 and kv_b 32 + 32 rows (4 heads = 256 rows per rank), o_proj 8 × 32 input columns (128 per rank),
    intermediate sizes 256 (128 per rank); q_proj without q_lora."""
    return build_hf(seed=12, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None, qk_nope_head_dim=32,
                    qk_rope_head_dim=32, v_head_dim=32, intermediate_size=256, moe_intermediate_size=256,
                    **overrides)  # fmt: skip


def test_fp8_blocks_tp2_equals_tp1_and_a_cut_block_is_refused(tmp_path):
    """DeepSeek's FP8 checkpoint layout: each rank keeps its rows / columns of the FP8 values and of the block
    scales; tp=2 (split experts, and expert parallel) equals tp=1. A checkpoint whose splits fall inside blocks
    (build_hf's dims: 4 heads of 24 q rows, rows 0:48 of 96; dense intermediate 128, columns 0:64) is refused at
    load, naming the tensor."""
    folder, ref_folder = tmp_path / "fp8", tmp_path / "fp8-reference"
    write_fp8_checkpoint(fp8_hf(), str(folder), str(ref_folder), with_mtp=False)
    ref = resolve_model(str(folder))
    one = run_engine(ref, 1)
    assert_same(one, run_engine(ref, 2))
    assert_same(one, run_engine(ref, 2, expert_parallel=True))

    bad, bad_ref = tmp_path / "fp8-cut", tmp_path / "fp8-cut-reference"
    write_fp8_checkpoint(build_hf(seed=13), str(bad), str(bad_ref), with_mtp=False)
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.\d+\..*cuts the FP8 128×128 blocks"):
        LLMEngine(resolve_model(str(bad)), EngineConfig(dtype="float32", max_model_len=128, tensor_parallel_size=2))
    assert not torch.distributed.is_initialized()


def test_gguf_deepseek2_q8_0_tp2_equals_tp1(tmp_path, tiny_deepseek_tp):
    """GGUF `deepseek2` (experts Q8_0, kv_b whole in layer 0 and split into attn_k_b / attn_v_b after): each rank
    keeps its heads of k_b / v_b, its rows of the Q8_0 gate/up and its 32-value blocks of down (moe_intermediate 64:
    32 columns per rank). tp=2, with and without expert parallel, equals tp=1."""
    hf = build_hf(seed=14, moe_intermediate_size=64)
    path = tmp_path / "tiny-deepseek2.gguf"
    write_deepseek2_gguf(hf, path)
    ref = resolve_model(str(path))
    tokenizer = load_tokenizer(tiny_deepseek_tp)  # the same byte-level vocabulary; the file carries none
    one = run_engine(ref, 1, tokenizer=tokenizer)
    assert_same(one, run_engine(ref, 2, tokenizer=tokenizer))
    assert_same(one, run_engine(ref, 2, expert_parallel=True, tokenizer=tokenizer))
