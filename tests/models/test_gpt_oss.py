"""Hearth's gpt-oss against transformers' GptOssForCausalLM: tiny random checkpoints (bf16 layout and MXFP4 layout),
prefill logits and step-by-step paged decode beyond the sliding window, the MoE fast path against its reference."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import prefill_logits, write_byte_tokenizer
from safetensors.torch import save_file

from hearth.quant.mxfp4 import dequantize_mxfp4
from hearth.sampling_params import SamplingParams

WINDOW = 4


def tiny_config(**overrides):
    from transformers import GptOssConfig

    kwargs = dict(
        num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
        head_dim=16, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, sliding_window=WINDOW,
        max_position_embeddings=256, attn_implementation="eager", tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def randomize(model) -> None:
    """Random sinks, biases and larger expert weights, so sinks, biases and the SwiGLU clamp all matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 1.0)
            elif name.endswith("bias") or name.endswith("gate_up_proj"):
                p.normal_(0, 0.5)


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory):
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(tiny_config()).eval()
    randomize(model)
    folder = str(tmp_path_factory.mktemp("tiny-gpt-oss"))
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder, 256)
    return folder, model


def write_mxfp4_checkpoint(folder: str, hf_model, seed: int = 0) -> None:
    """The published layout: experts as `*_blocks` (E, rows, G, 16) / `*_scales` (E, rows, G) uint8 with random codes
    and scales, everything else as saved by transformers; then put the exact dequantized experts into `hf_model`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = hf_model.config
    tensors = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for name, rows, cols in (("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
                                 ("down_proj", cfg.hidden_size, cfg.intermediate_size)):  # fmt: skip
            groups = cols // 32
            blocks = torch.randint(0, 256, (cfg.num_local_experts, rows, groups, 16), dtype=torch.uint8, generator=gen)
            scales = torch.randint(117, 124, (cfg.num_local_experts, rows, groups), dtype=torch.uint8, generator=gen)
            del tensors[prefix + name]
            tensors[prefix + name + "_blocks"], tensors[prefix + name + "_scales"] = blocks, scales
            with torch.no_grad():  # HF holds (E, in, out)
                getattr(hf_model.model.layers[i].mlp.experts, name).copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    write_byte_tokenizer(folder, cfg.vocab_size)


@pytest.fixture(scope="module")
def tiny_gpt_oss_mxfp4(tmp_path_factory):
    from transformers import GptOssForCausalLM

    torch.manual_seed(1)
    model = GptOssForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    randomize(model)
    folder = str(tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4"))
    write_mxfp4_checkpoint(folder, model)
    return folder, model


def check_prefill_and_decode(folder: str, hf, atol: float = 1e-4) -> None:
    from hearth import LLM

    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128, max_num_seqs=4)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (24,))  # 6× the window
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    ours = prefill_logits(llm.engine.runner.model, ids)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4)

    # two sequences of different lengths decode together through the paged cache (block size 4)
    prompts = [ids.tolist(), ids[:13].tolist()]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        full = torch.tensor(prompt + out.token_ids)
        with torch.inference_mode():
            ref_lp = hf(full[None]).logits[0].float().log_softmax(-1)
        for step, lp in enumerate(out.logprobs):
            pos = len(prompt) - 1 + step
            assert lp.token_id == int(ref_lp[pos].argmax())
            assert abs(lp.logprob - ref_lp[pos, lp.token_id].item()) <= atol


def test_tiny_gpt_oss_matches_transformers(tiny_gpt_oss):
    folder, hf = tiny_gpt_oss
    check_prefill_and_decode(folder, hf)


def test_tiny_gpt_oss_mxfp4_matches_transformers(tiny_gpt_oss_mxfp4):
    """Loaded values are exactly the dequantized codes, experts stay packed, logits match HF on those values."""
    from hearth import LLM
    from hearth.quant.mxfp4 import Mxfp4Weight

    folder, hf = tiny_gpt_oss_mxfp4
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64)
    model = llm.engine.runner.model
    for i, layer in enumerate(model.model.layers):
        experts, ref = layer.mlp.experts, hf.model.layers[i].mlp.experts
        assert isinstance(experts.gate_up, Mxfp4Weight) and isinstance(experts.down, Mxfp4Weight)
        assert experts.gate_up.blocks.dtype == torch.uint8
        assert torch.equal(experts.gate_up.dequantize(), ref.gate_up_proj.detach().transpose(1, 2))
        assert torch.equal(experts.down.dequantize(), ref.down_proj.detach().transpose(1, 2))
    del llm
    check_prefill_and_decode(folder, hf)


def test_moe_fast_path_matches_reference(tiny_gpt_oss_mxfp4):
    from hearth import LLM

    folder, _ = tiny_gpt_oss_mxfp4
    model = LLM(folder, dtype="float32", max_model_len=64).engine.runner.model
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3))
    fast = prefill_logits(model, ids)
    model.set_moe_reference(True)
    ref = prefill_logits(model, ids)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    model.set_moe_reference(False)


def test_sliding_layers_hold_only_their_window(tiny_gpt_oss):
    """Paged through two KV groups: chunked prefill (5 tokens a step) reading back the cache, decode, then a
    prefix-cache hit; the sliding layers' table never holds more than the window needs, and logits match HF."""
    from hearth import LLM

    folder, hf = tiny_gpt_oss
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=5)
    engine = llm.engine
    assert engine.runner.kv_windows == (None, WINDOW)
    # a block id costs the memory of one group's layers: sliding and full layers share the cache tensors
    attn = [layer.self_attn.attn for layer in engine.runner.model.model.layers]
    assert attn[0].k_cache is attn[1].k_cache and attn[2].k_cache is not attn[0].k_cache
    torch.manual_seed(3)
    prompt = torch.randint(0, 256, (23,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    runs = []
    for run in range(2):
        seq = engine.add_request(prompt, params, f"r{run}")
        most_held = longest = 0
        while engine.has_unfinished():
            engine.step()
            if not seq.is_finished:
                full, sliding = seq.block_tables
                assert -1 not in full and len(full) == len(sliding)
                held = sum(b != -1 for b in sliding)
                most_held, longest = max(most_held, held), max(longest, len(full))
                # the window before the next token plus one step's 5 tokens, rounded out to blocks
                assert held <= -(-(WINDOW - 1 + 5) // 4) + 1
        assert longest == 8 and most_held <= 3  # 32 tokens' blocks in the full group, at most 3 in the sliding one
        assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks - len(
            [b for b in engine.scheduler.block_manager.blocks if b.ref_count]
        )
        runs.append((seq.num_cached_tokens, seq.output_token_ids, [lp.logprob for lp in seq.logprobs]))
        full_ids = torch.tensor(seq.token_ids)
        with torch.inference_mode():
            ref_lp = hf(full_ids[None]).logits[0].float().log_softmax(-1)
        for step, lp in enumerate(seq.logprobs):
            pos = len(prompt) - 1 + step
            assert lp.token_id == int(ref_lp[pos].argmax())
            assert abs(lp.logprob - ref_lp[pos, lp.token_id].item()) <= 1e-4
    assert runs[0][0] == 0 and runs[1][0] == 20  # the second run found 5 blocks in both groups
    assert runs[1][1] == runs[0][1]  # a hit gives the same tokens as a miss
    torch.testing.assert_close(torch.tensor(runs[1][2]), torch.tensor(runs[0][2]), atol=1e-5, rtol=0)
    assert all(b.ref_count == 0 for b in engine.scheduler.block_manager.blocks)


def test_sliding_layers_in_kv_spec(tiny_gpt_oss):
    from hearth.config import kv_spec
    from hearth.loader.inspect import read_hf_config

    spec = kv_spec(read_hf_config(tiny_gpt_oss[0]))
    assert [layer.sliding_window for layer in spec.layers] == [WINDOW, None, WINDOW]
    assert [(g.sliding_window, g.layers) for g in spec.groups] == [(None, (1,)), (WINDOW, (0, 2))]
    # layer 1 (full) shares layer 0's tensors; a block id costs 2 layers' memory, not 3
    assert spec.storage_slots() == [0, 0, 1]
    per_layer_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads of 16, bf16
    assert spec.block_bytes(4) == 2 * 4 * per_layer_token


def test_gpt_oss_20b_kv_memory():
    """The real shape: 12 sliding + 12 full layers pair up, so a block id costs 12 layers, half of 24."""
    from hearth.config import ModelConfig, kv_bytes, kv_spec

    cfg = ModelConfig.from_hf(dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128, num_local_experts=32,
        num_experts_per_tok=4, layer_types=["sliding_attention", "full_attention"] * 12,
    ))  # fmt: skip
    spec = kv_spec(cfg)
    assert spec.block_bytes(16) == 12 * 16 * 2 * 8 * 64 * 2
    # what one 8k-token sequence holds: 12 full layers of 8192 tokens + 12 sliding layers of 128
    assert kv_bytes(spec, 8192) == (12 * 8192 + 12 * 128) * 2 * 8 * 64 * 2


def test_gguf_mxfp4_experts_convert_to_hf_layout():
    """GGUF MXFP4 (split halves, scale first) → HF interleaved blocks: same values as gguf-py's dequantization."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from hearth.quant.mxfp4 import from_gguf

    w = dequantize_mxfp4(torch.randint(0, 256, (2, 8, 4, 16), dtype=torch.uint8),
                         torch.randint(120, 130, (2, 8, 4), dtype=torch.uint8))  # fmt: skip
    raw = quantize(w.numpy(), GGMLQuantizationType.MXFP4)
    ours = from_gguf(torch.from_numpy(raw), (2, 8, 128))
    oracle = dequantize(raw, GGMLQuantizationType.MXFP4).reshape(2, 8, 128)
    assert torch.equal(ours.dequantize(), torch.from_numpy(np.ascontiguousarray(oracle)))
    assert torch.equal(ours.dequantize(), w)


def test_int8_weights_requantize_attention_and_head_not_the_router(tiny_gpt_oss):
    """--int8-weights: qkv, o and the LM head become Q8_0 blocks, the router stays dense (routing as the checkpoint
    computes it); logits stay within Q8_0's rounding of the bf16 model's, and decoding runs on the blocks."""
    from hearth import LLM
    from hearth.kernels import gguf_cpu
    from hearth.layers.linear import BlocksMethod, DenseMethod

    if not gguf_cpu.available():
        pytest.skip("no C compiler: the Q8_0 blocks need the C kernels")
    folder, _ = tiny_gpt_oss
    plain = LLM(folder, dtype="bfloat16", max_model_len=64)
    quant = LLM(folder, dtype="bfloat16", max_model_len=64, int8_weights=True)
    model = quant.engine.runner.model
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.qkv_proj.method, BlocksMethod)
        assert isinstance(layer.self_attn.o_proj.method, BlocksMethod)
        assert isinstance(layer.mlp.router.method, DenseMethod)
    assert isinstance(model.lm_head.method, BlocksMethod)
    assert isinstance(plain.engine.runner.model.lm_head.method, DenseMethod)
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    ours, ref = prefill_logits(model, ids), prefill_logits(plain.engine.runner.model, ids)
    assert (ours - ref).abs().max() / ref.abs().max() < 0.05
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert len(quant.generate([ids.tolist()], params)[0].token_ids) == 6
