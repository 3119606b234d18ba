"""Hearth's Llama-family model against HF transformers: the embedded GGUF and tiny random safetensors checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import prefill_logits

from hearth.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from hearth import LLM

    folder = tmp_path_factory.mktemp("smollm2-gguf")
    os.symlink(smollm2_path, folder / "model.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf", dtype=torch.float32).eval()
    llm = LLM("smollm2", dtype="float32", max_model_len=512, max_num_seqs=4)
    return llm, hf


def test_smollm2_logits_match_transformers(smollm2_pair):
    llm, hf = smollm2_pair
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]
    assert len(ids) == 64
    ours = prefill_logits(llm.engine.runner.model, torch.tensor(ids))
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_smollm2_greedy_continuation_matches_transformers(smollm2_pair):
    llm, hf = smollm2_pair
    prompt = llm.tokenizer.encode("Once upon a time, in a small village by the sea,")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert out.token_ids == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("fixture", ["tiny_llama3", "tiny_qwen2"])
def test_tiny_checkpoint_logits_and_decode(fixture, request):
    """Prefill logits ≤ 1e-4, and the paged-cache decode path gives the same per-step logprobs as HF."""
    from hearth import LLM

    folder, hf = request.getfixturevalue(fixture)
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=128)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (40,))
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    ours = prefill_logits(llm.engine.runner.model, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # step by step through the paged cache (block size 4, so tokens cross many blocks)
    out = llm.generate([ids.tolist()], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))[0]
    full = torch.tensor(ids.tolist() + out.token_ids)
    with torch.inference_mode():
        ref_lp = hf(full[None]).logits[0].float().log_softmax(-1)
    for step, lp in enumerate(out.logprobs):
        pos = len(ids) - 1 + step
        assert lp.token_id == int(ref_lp[pos].argmax())
        assert abs(lp.logprob - ref_lp[pos, lp.token_id].item()) <= 1e-4


def test_tiny_qwen2_has_bias_and_tied_embeddings(tiny_qwen2):
    from hearth import LLM

    folder, _ = tiny_qwen2
    llm = LLM(folder, dtype="float32", max_model_len=64)
    model = llm.engine.runner.model
    assert model.lm_head is None  # tied
    assert model.model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0


def test_llama3_gguf_with_rope_freqs_matches_transformers(tiny_llama3, tmp_path):
    """Llama 3.x GGUF files carry their rope scaling as `rope_freqs.weight` (llama.cpp divides each frequency)."""
    import gguf

    from hearth.layers.rotary import default_inv_freq, llama3_inv_freq
    from hearth.loader.inspect import read_gguf_config
    from hearth.loader.load import load_model
    from hearth.loader.names import permute_qk
    from hearth.loader.resolve import ModelRef
    from hearth.models.registry import model_class

    _, hf = tiny_llama3
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    path = str(tmp_path / "llama3.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    w.add_rope_freq_base(theta)
    w.add_vocab_size(cfg.vocab_size)
    inv = default_inv_freq(head_dim, theta)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    w.add_tensor("rope_freqs.weight", (inv / llama3_inv_freq(inv, scaling)).numpy().astype("float32"))
    names = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for name, t in hf.state_dict().items():
        t = t.float()
        if ".q_proj." in name:
            t = permute_qk(t, cfg.num_attention_heads)
        elif ".k_proj." in name:
            t = permute_qk(t, cfg.num_key_value_heads)
        gguf_name = name.removesuffix(".weight")
        for hf_part, gguf_part in names.items():
            gguf_name = gguf_name.replace(hf_part, gguf_part)
        gguf_name = gguf_name.replace("model.layers.", "blk.")
        w.add_tensor(gguf_name + ".weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config = read_gguf_config(path)
    model = model_class(config)(config)
    load_model(model, ModelRef(path, path, "gguf"), torch.float32, keep_quantized=False)
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(3))  # past the 64 original positions
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    torch.testing.assert_close(prefill_logits(model, ids), theirs, atol=1e-4, rtol=1e-4)
