"""Shared fixtures: the embedded model, tiny random HF checkpoints built with transformers, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch


def pytest_configure(config):
    # tests never read or write the user's ~/.hearth (keys, audit log, usage ledger)
    os.environ["HEARTH_HOME"] = tempfile.mkdtemp(prefix="hearth-test-home-")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from hearth.loader.resolve import embedded_model_path

    return embedded_model_path()


def write_byte_tokenizer(folder: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges (ids 0..255 are bytes); the rest of the vocab is unused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet)[:256]
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": None, "add_bos_token": False}, f)


def save_tiny(model, folder: str) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder, model.config.vocab_size)
    return folder


def randomize_biases(model) -> None:
    """HF zero-initialises linear biases; make them random so the bias path is actually tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    return save_tiny(model, str(tmp_path_factory.mktemp("tiny-llama3"))), model


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    randomize_biases(model)
    return save_tiny(model, str(tmp_path_factory.mktemp("tiny-qwen2"))), model


def prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """All-position logits of one sequence through a model, without a KV cache."""
    from hearth.layers.context import Context, reset_context, set_context

    set_context(Context(q_starts=[0, len(ids)], context_lens=[len(ids)], prefill_seq_idx=[0]))
    try:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(len(ids)))).float()
    finally:
        reset_context()
