"""DeepSeek-V3 against transformers on tiny random checkpoints: MLA (naive and absorbed), the latent paged cache,
grouped noaux_tc routing, FP8 128×128 block weights with partial edge blocks, the skipped MTP layer and GGUF
`deepseek2`.

Measured in float32 (seed 0): prefill logits differ from HF by ~2e-7 in both MLA forms, and the absorbed form differs
from the naive one by ~2e-7; the assertions use 1e-4 (docs/models.md §5.2 allows 2e-4 for the absorbed form).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import save_tiny, write_byte_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from test_models_vs_hf import prefill_logits

from hearth.quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from hearth.sampling_params import SamplingParams

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}  # fmt: skip
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj", "eh_proj")  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread avoids OpenMP spinning against other processes."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def build_hf(seed: int = 0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        num_hidden_layers=3, first_k_dense_replace=1, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
        n_shared_experts=1, routed_scaling_factor=2.5, vocab_size=256, max_position_embeddings=2560,
        rope_parameters=dict(YARN), attn_implementation="eager",
    )  # fmt: skip
    kwargs.update(overrides)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs)).eval()
    with torch.no_grad():  # HF starts the correction bias at zero; make it matter for the choice of experts
        for layer in model.model.layers[kwargs["first_k_dense_replace"] :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


@pytest.fixture(scope="module", params=[32, None], ids=["q_lora", "q_proj"])
def tiny_deepseek(request, tmp_path_factory):
    hf = build_hf(q_lora_rank=request.param)
    return save_tiny(hf, str(tmp_path_factory.mktemp("tiny-deepseek"))), hf


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(ids[None]).logits[0].float()


def test_logits_match_transformers_naive_and_absorbed(tiny_deepseek):
    from hearth import LLM

    folder, hf = tiny_deepseek
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128)
    model = llm.engine.runner.model
    assert model.fp8_mode is None
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    theirs = hf_logits(hf, ids)
    ours = {}
    for mode in ("naive", "absorbed"):
        model.set_mla_mode(mode)
        ours[mode] = prefill_logits(model, ids)
        torch.testing.assert_close(ours[mode], theirs, atol=1e-4, rtol=1e-4)
    model.set_mla_mode("auto")
    assert (ours["naive"] - ours["absorbed"]).abs().max().item() <= 1e-5


def test_paged_decode_matches_transformers(tiny_deepseek):
    """Two sequences of different lengths decode together through the latent cache (block size 4, absorbed form);
    each step's logprob matches HF's full recompute, and naive-form decode picks the same tokens."""
    from hearth import LLM

    folder, hf = tiny_deepseek
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 9)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref = hf_logits(hf, torch.tensor(prompt + out.token_ids)).log_softmax(-1)
        for step, lp in enumerate(out.logprobs):
            pos = len(prompt) - 1 + step
            assert lp.token_id == int(ref[pos].argmax())
            assert abs(lp.logprob - ref[pos, lp.token_id].item()) <= 1e-4
    llm.engine.runner.model.set_mla_mode("naive")
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in outs]


def test_bf16_decode_through_the_mla_kernel(tiny_deepseek, monkeypatch):
    """In bf16 the decode rows attend through attention_cpu.mla_decode (one C call per layer); the tokens and logprobs
    match the torch absorbed form's (which rounds q_lat, scores and p to bf16: logprobs within 0.02). This random tiny
    model's next-token distribution is nearly flat, so the two may part only where each run's top two are within that
    tolerance (on an AVX2 CPU with float32 prefill attention they parted at logprobs 2e-6 apart); the rest of such a
    pair is not compared."""
    from hearth import LLM
    from hearth.kernels import attention_cpu
    from hearth.models import deepseek_v3

    if attention_cpu._get() is None:
        pytest.skip("needs a C compiler")
    folder, _ = tiny_deepseek
    llm = LLM(folder, dtype="bfloat16", block_size=4, max_model_len=128)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    calls = []
    kernel = deepseek_v3.latent_decode_attention

    def counted(*args):
        out = kernel(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(deepseek_v3, "latent_decode_attention", counted)
    fused = llm.generate(prompts, params)
    assert calls and all(calls)
    monkeypatch.setattr(deepseek_v3, "latent_decode_attention", lambda *args: None)
    plain = llm.generate(prompts, params)
    compared = 0
    for a, b in zip(fused, plain):
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) <= 0.02
            compared += 1
            if x.token_id != y.token_id:  # a tie within the tolerance, seen from both runs
                tx, ty = dict(x.top), dict(y.top)
                assert y.token_id in tx and tx[x.token_id] - tx[y.token_id] <= 0.02
                assert x.token_id in ty and ty[y.token_id] - ty[x.token_id] <= 0.02
                break
    assert compared >= 9


def test_latent_cache_layout(tiny_deepseek):
    from hearth import LLM

    folder, _ = tiny_deepseek
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    assert attn.kv_cache.shape[1:] == (4, 16 + 8)  # [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]


def test_grouped_routing_matches_transformers():
    from hearth.models.deepseek_v3 import grouped_topk

    hf = build_hf()
    router = hf.model.layers[1].mlp.gate
    hidden = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden)
    weights, ids = grouped_topk(logits, router.e_score_correction_bias, 2, 4, 2, True, 2.5)
    ref_ids, order = ref_ids.sort(dim=-1)
    ids, mine = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, mine), ref_weights.gather(1, order), atol=1e-6, rtol=1e-6)
    # the bias only chooses: the weights are the unbiased sigmoid scores, normalised and scaled
    scores = logits.sigmoid().gather(1, ids)
    torch.testing.assert_close(weights.gather(1, mine), 2.5 * scores / scores.sum(-1, keepdim=True))
    # only experts of the topk_group best groups are chosen
    biased = logits.sigmoid() + router.e_score_correction_bias
    group_scores = biased.view(-1, 4, 2).sum(-1)  # 2 experts per group: the top-2 sum is the group's sum
    best = group_scores.topk(2, dim=-1).indices
    assert all(set((ids[t] // 2).tolist()) <= set(best[t].tolist()) for t in range(len(ids)))


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_routing_with_every_group_kept_is_plain_top_k(scoring_func):
    from hearth.models.deepseek_v3 import grouped_topk

    gen = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(64, 16, generator=gen), torch.randn(16, generator=gen) * 0.1
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(-1)
    ref_ids = (scores + bias).topk(3, dim=-1).indices
    for groups in (1, 4):  # one group (V2-Lite) or all groups kept: no group limits the choice
        weights, ids = grouped_topk(logits, bias, 3, groups, groups, False, 1.0, scoring_func)
        # the C router's expf may differ from torch's exp by an ulp
        assert torch.equal(ids, ref_ids) and (weights - scores.gather(1, ref_ids)).abs().max().item() <= 1e-6


# ---- FP8 block weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 7), (129, 131)])
def test_fp8_block_dequant_reference(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == ((shape[0] + 127) // 128, (shape[1] + 127) // 128)
    expected = torch.empty(shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            expected[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
    assert torch.equal(dequantize_fp8_block(q, scale_inv), expected)
    assert (expected - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequantize_fp8_block(q, torch.ones(9, 9))


def write_fp8_checkpoint(hf, folder: str, ref_folder: str, with_mtp: bool = True) -> None:
    """DeepSeek's published layout: every linear inside the decoder layers as float8_e4m3fn plus a float32
    `weight_scale_inv` per 128×128 block (router, norms, embeddings and head stay float). `ref_folder` gets the exact
    dequantized weights in float32 for transformers. With `with_mtp`, an MTP layer (index num_hidden_layers) is added
    the way V3 ships it: enorm, hnorm, eh_proj, shared_head and a full MoE decoder layer."""
    save_tiny(hf, ref_folder)
    path = os.path.join(ref_folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    num_layers = hf.config.num_hidden_layers
    if with_mtp:
        last = f"model.layers.{num_layers - 1}."
        hidden = hf.config.hidden_size
        gen = torch.Generator().manual_seed(5)
        mtp = {name.replace(last, f"model.layers.{num_layers}."): t.clone()
               for name, t in tensors.items() if name.startswith(last)}  # fmt: skip
        mtp |= {
            f"model.layers.{num_layers}.{name}": torch.randn(shape, generator=gen) * 0.02
            for name, shape in {
                "enorm.weight": (hidden,),
                "hnorm.weight": (hidden,),
                "eh_proj.weight": (hidden, 2 * hidden),
                "shared_head.norm.weight": (hidden,),
                "shared_head.head.weight": (hf.config.vocab_size, hidden),
            }.items()
        }
    else:
        mtp = {}
    stored, dequantized = {}, {}
    for name, t in (tensors | mtp).items():
        module = name.rsplit(".", 2)[-2]
        if name.startswith("model.layers.") and module in FP8_LINEARS and name.endswith(".weight"):
            q, scale_inv = quantize_fp8_block(t)
            stored[name], stored[name + "_scale_inv"] = q, scale_inv
            t = dequantize_fp8_block(q, scale_inv)
        else:
            stored[name] = t
        if name in tensors:
            dequantized[name] = t
    save_file(dequantized, path, metadata={"format": "pt"})
    os.makedirs(folder, exist_ok=True)
    save_file(stored, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ref_folder, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    write_byte_tokenizer(folder, hf.config.vocab_size)


@pytest.fixture(scope="module")
def fp8_deepseek(tmp_path_factory):
    """Dims that are not multiples of 128 (hidden 136, q_lora_rank 144, dense 264), so edge blocks are partial."""
    from transformers import DeepseekV3ForCausalLM

    hf = build_hf(hidden_size=136, q_lora_rank=144, intermediate_size=264, moe_intermediate_size=40)
    folder, ref_folder = tmp_path_factory.mktemp("fp8-deepseek"), tmp_path_factory.mktemp("fp8-reference")
    write_fp8_checkpoint(hf, str(folder), str(ref_folder))
    reference = DeepseekV3ForCausalLM.from_pretrained(str(ref_folder), dtype=torch.float32,
                                                      attn_implementation="eager").eval()  # fmt: skip
    return str(folder), reference


def test_fp8_checkpoint_loads_exact_dequantized_values_and_skips_mtp(fp8_deepseek):
    from hearth import LLM

    folder, reference = fp8_deepseek
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert any(name.startswith("model.layers.3.") for name in f.keys())  # noqa: SIM118  # the MTP layer is in the file
        assert f.get_slice("model.layers.1.self_attn.q_b_proj.weight").get_dtype() == "F8_E4M3"
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64)
    model = llm.engine.runner.model
    assert model.fp8_mode == "dequantized" and len(model.model.layers) == 3
    for i in range(3):
        ours, theirs = model.model.layers[i], reference.model.layers[i]
        assert torch.equal(ours.self_attn.o_proj.weight, theirs.self_attn.o_proj.weight)
        kv_b = theirs.self_attn.kv_b_proj.weight.view(4, -1, theirs.self_attn.kv_b_proj.weight.shape[1])
        nope = ours.self_attn.nope_dim
        assert torch.equal(ours.self_attn.w_uk_t, kv_b[:, :nope].transpose(1, 2))  # kv_b's rows, per head
        assert torch.equal(ours.self_attn.w_uv, kv_b[:, nope:])
        assert ours.self_attn.kv_b_proj.weight is None  # not held twice
        # rows as the checkpoint has them (the rope values are de-interleaved after the projection)
        assert torch.equal(ours.self_attn.q_b_proj.weight, theirs.self_attn.q_b_proj.weight)
    ref_moe = reference.model.layers[2].mlp
    for e in range(8):
        assert torch.equal(model.model.layers[2].mlp.experts[e].gate_up_proj.weight, ref_moe.experts.gate_up_proj[e])
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_fp8_kept_in_memory_gives_the_same_logits(fp8_deepseek):
    """The keep-FP8 path (used on CUDA devices with FP8) forced on CPU: weights stay float8, results are identical."""
    from hearth.layers.fp8_linear import Fp8Linear
    from hearth.loader.inspect import read_hf_config
    from hearth.loader.load import load_model
    from hearth.loader.resolve import ModelRef
    from hearth.models.deepseek_v3 import DeepseekV3ForCausalLM

    folder, reference = fp8_deepseek
    config = read_hf_config(folder)
    model = DeepseekV3ForCausalLM(config)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.keep_fp8 = True
    load_model(model, ModelRef(folder, folder, "hf"), torch.float32, keep_quantized=True)
    attn = model.model.layers[1].self_attn
    assert attn.q_b_proj.fp8.weight.dtype == torch.float8_e4m3fn and attn.q_b_proj.weight is None
    assert attn.kv_a_proj_with_mqa.fp8 is not None and attn.kv_b_proj.fp8 is None  # kv_b is always dense
    assert model.fp8_mode == "mixed"  # fused gate/up of 264 + 264 rows: the shard edge is not on a block edge
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_unexpected_tensor_outside_the_mtp_layer_is_an_error(fp8_deepseek, tmp_path):
    from hearth import LLM
    from hearth.loader import ModelLoadError

    folder, _ = fp8_deepseek
    shutil.copytree(folder, tmp_path / "bad")
    path = tmp_path / "bad" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["model.layers.1.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="bogus"):
        LLM(str(tmp_path / "bad"), dtype="float32", max_model_len=64)


# ---- GGUF deepseek2 ---------------------------------------------------------------------------------------------


def with_q8_experts(hf):
    """A copy of the HF model whose routed experts hold the Q8_0 values write_deepseek2_gguf stores."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    reference = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in reference.model.layers[1:]:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(p.numpy(), T.Q8_0), T.Q8_0)))
    return reference


def write_deepseek2_gguf(hf, path, gating: int | None = 2, norm_topk_prob: bool = True, nextn: dict | None = None,
                        q8_shared: bool = False) -> None:  # fmt: skip
    """The tiny model as llama.cpp's converter lays it out: kv_b split into k_b (transposed) / v_b in layers ≥ 1 and
    whole in layer 0, experts stacked; expert weights (and with `q8_shared` the shared experts') in Q8_0, the rest
    float32. Rope rows stay interleaved.
    `gating`: deepseek2.expert_gating_func (2 sigmoid as V3 files, 1 softmax as V2 files, None: key absent).
    `nextn`: the model's last layer is an MTP layer: these tensors ({"eh_proj": ..., "enorm": ...}) are added to its
    block as `blk.N.nextn.*`, `deepseek2.nextn_predict_layers` is 1, and a tokenizer is written too."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType, GGUFWriter, Keys, RopeScalingType, quants

    cfg = hf.config
    heads, nope, v_dim, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    w = GGUFWriter(str(path), "deepseek2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_key_length(c + cfg.qk_rope_head_dim)
    w.add_value_length(c)
    w.add_key_length_mla(nope + cfg.qk_rope_head_dim)
    w.add_value_length_mla(v_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(40.0)
    w.add_rope_scaling_orig_ctx_len(64)
    w.add_rope_scaling_yarn_log_mul(0.1 * 1.0)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(c)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(norm_topk_prob)
    if gating is not None:
        w.add_uint32(Keys.LLM.EXPERT_GATING_FUNC.format(arch="deepseek2"), gating)
    w.add_vocab_size(cfg.vocab_size)
    if nextn is not None:
        from gguf_models import tokenizer_kvs

        w.add_uint32("deepseek2.nextn_predict_layers", 1)
        for key, value, vtype in tokenizer_kvs(cfg.vocab_size):
            w.add_key_value(key, value, vtype, sub_type=GGUFValueType.STRING if key == "tokenizer.ggml.tokens" else
                            GGUFValueType.INT32 if key == "tokenizer.ggml.token_type" else None)  # fmt: skip

    def add(name: str, t: torch.Tensor, q8: bool = False) -> None:
        a = t.float().numpy()
        if q8:
            w.add_tensor(name, quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_a_proj": "attn_q_a",
             "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
             "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
             "mlp.shared_experts.up_proj": "ffn_up_shexp",
             "mlp.shared_experts.down_proj": "ffn_down_shexp"}  # fmt: skip
    inter = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, gguf_name in names.items():
            if p + hf_name + ".weight" in sd:
                add(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"], q8=q8_shared and "shexp" in gguf_name)
        kv_b = sd[p + "self_attn.kv_b_proj.weight"]
        if i == 0:
            add(f"blk.{i}.attn_kv_b.weight", kv_b)
        else:
            k_b, v_b = kv_b.view(heads, nope + v_dim, c).split([nope, v_dim], dim=1)
            add(f"blk.{i}.attn_k_b.weight", k_b.transpose(1, 2).contiguous())
            add(f"blk.{i}.attn_v_b.weight", v_b.contiguous())
        if p + "mlp.gate.e_score_correction_bias" in sd:
            add(f"blk.{i}.exp_probs_b.bias", sd[p + "mlp.gate.e_score_correction_bias"])
        if p + "mlp.experts.gate_up_proj" in sd:
            gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
            add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter], q8=True)
            add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:], q8=True)
            add(f"blk.{i}.ffn_down_exps.weight", down, q8=True)
    for name, t in (nextn or {}).items():
        add(f"blk.{cfg.num_hidden_layers - 1}.nextn.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_deepseek2_matches_transformers(tmp_path):

    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.load import load_model
    from hearth.loader.resolve import ModelRef
    from hearth.models.registry import model_class

    hf = build_hf(seed=7)
    path = tmp_path / "tiny-deepseek2.gguf"
    write_deepseek2_gguf(hf, path)
    reference = with_q8_experts(hf)
    config = read_gguf_config(str(path))
    assert (config.kv_lora_rank, config.qk_nope_head_dim, config.v_head_dim) == (16, 16, 16)
    model = model_class(config)(config)
    load_model(model, ModelRef(str(path), str(path), "gguf"), torch.float32, keep_quantized=False)
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(reference, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_gguf_moe_runs_the_experts_in_one_kernel_call(tmp_path, monkeypatch, decode):
    from hearth.kernels import gguf_cpu
    from hearth.layers.context import Context, reset_context, set_context
    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.load import load_model
    from hearth.loader.resolve import ModelRef
    from hearth.models.deepseek_v3 import DeepseekV3MLP
    from hearth.models.registry import model_class

    if not gguf_cpu.available():
        pytest.skip("no C compiler for the GGUF kernels")
    hf = build_hf(seed=5)
    path = tmp_path / "tiny-deepseek2-q8.gguf"
    write_deepseek2_gguf(hf, path, q8_shared=True)
    config = read_gguf_config(str(path))
    model = model_class(config)(config)
    load_model(model, ModelRef(str(path), str(path), "gguf"), torch.bfloat16, keep_quantized=True)
    moe = model.model.layers[1].mlp
    x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    fused_moe = moe.blocks_moe()
    assert fused_moe is not None
    with torch.inference_mode():
        moe._blocks_moe = None  # each expert on its own: blocks dequantized, bf16 matmuls
        ref = moe(x).float()
        moe._blocks_moe = fused_moe
        set_context(Context(decode_seq_idx=[0, 1, 2]) if decode else Context(q_starts=[0, 3], prefill_seq_idx=[0]))
        try:
            monkeypatch.setattr(DeepseekV3MLP, "forward", lambda *a: pytest.fail("an expert ran on its own"))
            fused = moe(x).float()
            monkeypatch.setattr(fused_moe, "MAX_TOKENS", 2)  # a long prompt, in pieces: the same per token
            assert torch.equal(moe(x).float(), fused)
        finally:
            reset_context()
    assert (fused - ref).abs().max() <= 0.03 * ref.abs().max()  # int8 activations against bf16 arithmetic


def v2_routed(hf, topk_method: str = "group_limited_greedy"):
    """The tiny V3 model with each MoE layer routed by transformers' DeepSeek-V2 router (softmax scores, no
    correction bias, weights not normalised) on the same router weight."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = hf.config
    v2 = DeepseekV2Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                          n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                          n_group=cfg.n_group, topk_group=cfg.topk_group, topk_method=topk_method,
                          routed_scaling_factor=cfg.routed_scaling_factor)  # fmt: skip
    for layer in hf.model.layers[cfg.first_k_dense_replace :]:
        router = DeepseekV2TopkRouter(v2)
        with torch.no_grad():
            router.weight.copy_(layer.mlp.gate.weight)
        layer.mlp.gate = router
    return hf


@pytest.mark.parametrize("topk_method", ["group_limited_greedy", "greedy"])
def test_softmax_routing_matches_transformers_v2(topk_method):
    from hearth.models.deepseek_v3 import grouped_topk

    router = v2_routed(build_hf(), topk_method).model.layers[1].mlp.gate
    hidden = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden)
    groups = (4, 2) if topk_method == "group_limited_greedy" else (1, 1)
    weights, ids = grouped_topk(logits, torch.zeros(8), 2, *groups, False, 2.5, scoring_func="softmax")
    ref_ids, order = ref_ids.sort(dim=-1)
    ids, mine = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, mine), ref_weights.gather(1, order), atol=1e-6, rtol=1e-6)
    # the reference formula: softmax over all experts, the chosen ones' probabilities times the scaling factor
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights.gather(1, mine), 2.5 * probs.gather(1, ids))
    normed, _ = grouped_topk(logits, torch.zeros(8), 2, *groups, True, 2.5, scoring_func="softmax")
    torch.testing.assert_close(normed.sum(-1), torch.full((256,), 2.5))
    if topk_method == "greedy":  # no groups: the two most probable experts
        assert torch.equal(ids, probs.topk(2, dim=-1).indices.sort(dim=-1).values)
    with pytest.raises(ValueError, match="scoring_func"):
        grouped_topk(logits, torch.zeros(8), 2, 1, 1, scoring_func="relu")


@pytest.mark.parametrize("gating", [2, 1, None], ids=["sigmoid", "softmax", "absent"])
def test_gguf_expert_gating_func_is_read(tmp_path, gating):
    from hearth.loader.inspect import read_gguf_config

    path = tmp_path / "tiny.gguf"
    write_deepseek2_gguf(build_hf(), path, gating=gating)
    # llama.cpp's enum: 1 softmax, 2 sigmoid; files without the key (V2 / V2.5 conversions) are softmax
    assert read_gguf_config(str(path)).extra["scoring_func"] == {2: "sigmoid", 1: "softmax", None: "softmax"}[gating]


def test_gguf_unknown_expert_gating_func_is_a_load_error(tmp_path):
    from hearth.loader import ModelLoadError
    from hearth.loader.inspect import read_gguf_config

    path = tmp_path / "tiny.gguf"
    write_deepseek2_gguf(build_hf(), path, gating=7)
    with pytest.raises(ModelLoadError, match="expert_gating_func 7"):
        read_gguf_config(str(path))


def test_hf_config_scoring_func_is_honoured(tmp_path):
    """An HF folder saying scoring_func softmax routes with softmax; one saying something else does not load."""
    from hearth.loader.inspect import read_hf_config
    from hearth.models.registry import model_class

    folder = save_tiny(build_hf(), str(tmp_path / "hf"))
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for value, want in (("softmax", "softmax"), (None, "sigmoid")):
        if value is None:
            cfg.pop("scoring_func", None)
        else:
            cfg["scoring_func"] = value
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        config = read_hf_config(folder)
        assert model_class(config)(config).model.layers[1].mlp.scoring_func == want
    config = read_hf_config(folder)
    config.extra["scoring_func"] = "relu"
    with pytest.raises(ValueError, match="scoring_func 'relu'"):
        model_class(config)(config)


@pytest.mark.parametrize("gating", [1, None], ids=["softmax", "absent"])
def test_gguf_deepseek2_softmax_gating_matches_transformers_v2_router(tmp_path, gating):
    """A V2-style file (softmax gating, no correction bias, weights not normalised) against the tiny model routed by
    transformers' DeepSeek-V2 router; the same file read as sigmoid gives other logits."""

    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.load import load_model
    from hearth.loader.resolve import ModelRef
    from hearth.models.registry import model_class

    hf = v2_routed(build_hf(seed=9, norm_topk_prob=False))
    path = tmp_path / "tiny-deepseek2-softmax.gguf"
    write_deepseek2_gguf(hf, path, gating=gating, norm_topk_prob=False)
    reference = with_q8_experts(hf)
    config = read_gguf_config(str(path))
    assert config.extra["scoring_func"] == "softmax" and not config.extra["norm_topk_prob"]
    model = model_class(config)(config)
    load_model(model, ModelRef(str(path), str(path), "gguf"), torch.float32, keep_quantized=False)
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(10))
    ours = prefill_logits(model, ids)
    torch.testing.assert_close(ours, hf_logits(reference, ids), atol=1e-4, rtol=1e-4)
    for layer in model.model.layers[1:]:
        layer.mlp.scoring_func = "sigmoid"
    assert (prefill_logits(model, ids) - ours).abs().max().item() > 1e-3
