"""Hearth's Llama-family model against HF transformers: the embedded GGUF and tiny random safetensors checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from hearth.layers.context import Context, reset_context, set_context
from hearth.sampling_params import SamplingParams


def prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """All-position logits of one sequence, without a KV cache."""
    set_context(Context(q_starts=[0, len(ids)], context_lens=[len(ids)], prefill_seq_idx=[0]))
    try:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(len(ids)))).float()
    finally:
        reset_context()


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
