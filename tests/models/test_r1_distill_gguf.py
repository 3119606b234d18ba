"""benchmarks/r1_distill_gguf.py's writer at a tiny qwen2 shape: the file loads in Hearth (and in llama.cpp when the
`bench` extra is installed), gives finite logits, and stores exactly gguf.quants' Q4_0 blocks."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from conftest import prefill_logits
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from hearth.sampling_params import SamplingParams

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "r1_distill_gguf.py")
PROMPT = [5, 17, 100, 250, 42, 7, 3, 99, 260, 1]


def load_script():
    spec = importlib.util.spec_from_file_location("r1_distill_gguf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def tiny_gguf(script, tmp_path_factory):
    """A 2-layer qwen2 with R1-Distill-Qwen-1.5B's head ratio (heads over 2 KV heads) and a 300-token vocabulary,
    quantized a few rows at a time so the chunked writer is exercised."""
    shape = script.Qwen2Shape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, intermediate_size=160, vocab_size=300, max_position_embeddings=512)  # fmt: skip
    path = str(tmp_path_factory.mktemp("r1-gguf") / "tiny.gguf")
    rows_per_chunk, script.ROWS_PER_CHUNK = script.ROWS_PER_CHUNK, 7
    try:
        summary = script.write_random_gguf(path, shape, seed=3)
    finally:
        script.ROWS_PER_CHUNK = rows_per_chunk
    return path, shape, summary


def test_vocab_is_consistent(script, monkeypatch):
    monkeypatch.setattr(script, "NUM_BPE_TOKENS", 500)  # the real vocabulary's layout, scaled down: pads at the end
    vocab = script.build_vocab(1000, seed=0)
    assert len(vocab.tokens) == len(vocab.types) == 1000 and len(set(vocab.tokens)) == 1000
    rank = {t: i for i, t in enumerate(vocab.tokens)}
    for i, merge in enumerate(vocab.merges):  # each merge joins two earlier tokens into the next new one
        left, right = merge.split(" ")
        assert rank[left] < 256 + i and rank[right] < 256 + i and rank[left + right] == 256 + i
    assert vocab.tokens[vocab.eos_id] == script.EOS and vocab.tokens[vocab.bos_id] == script.BOS
    specials = [t for t, _ in script.SPECIAL_TOKENS]
    assert vocab.tokens[500 : 500 + len(specials)] == specials and vocab.tokens[-1] == "[PAD999]"
    assert vocab.types[:500] == [1] * 500 and vocab.types[-1] == 5  # normal, unused


def test_q4_0_blocks_are_gguf_quants(script, tiny_gguf):
    path, shape, summary = tiny_gguf
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == summary["tensors"] == 3 + 12 * shape.num_hidden_layers
    for name, qtype in [("token_embd.weight", T.Q4_0), ("blk.1.ffn_down.weight", T.Q4_0), ("output.weight", T.Q8_0),
                        ("blk.0.attn_q.bias", T.F32)]:  # fmt: skip
        t = tensors[name]
        dims = tuple(int(d) for d in reversed(t.shape))
        assert t.tensor_type == qtype
        expected = script.random_weight(name, dims, seed=3)
        if qtype == T.F32:
            np.testing.assert_array_equal(t.data.reshape(dims), expected)
        else:
            assert np.array_equal(np.asarray(t.data).reshape(-1), quants.quantize(expected, qtype).reshape(-1))
    norm = np.asarray(tensors["output_norm.weight"].data)
    assert abs(norm.mean() - 1) < 0.01


@pytest.fixture(scope="module")
def hearth_llm(tiny_gguf):
    from hearth import LLM

    return LLM(tiny_gguf[0], dtype="float32", max_model_len=64)


def test_hearth_loads_it_and_decodes(hearth_llm):
    from hearth.chat.template import ChatTemplate

    llm = hearth_llm
    config = llm.engine.model_config
    assert (config.vocab_size, config.num_key_value_heads, config.head_dim) == (300, 2, 16)
    assert not config.tie_word_embeddings and config.attention_bias and config.rms_norm_eps == 1e-6
    logits = prefill_logits(llm.engine.runner.model, torch.tensor(PROMPT))
    assert logits.shape == (len(PROMPT), 300) and torch.isfinite(logits).all() and logits.std() > 0.05
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids[0] == int(logits[-1].argmax())
    tok = llm.tokenizer
    text = "Hello world, the quick brown fox."
    assert tok.decode(tok.encode(text)) == text and tok.encode(text)[0] == tok.bos_token_id
    template = ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nsum</think>4"},
                {"role": "user", "content": "3+3?"}]  # fmt: skip
    bos, eos = tok.bos_token, tok.eos_token
    assert (bos, eos) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    expected = f"{bos}<｜User｜>2+2?<｜Assistant｜>4{eos}<｜User｜>3+3?<｜Assistant｜><think>\n"
    assert template.render(messages, add_generation_prompt=True) == expected


def import_llama_cpp():
    """llama-cpp-python, or a skip: not installed, or installed without its library (built with LLAMA_BUILD=OFF and
    no LLAMA_CPP_LIB_PATH pointing at one), which raises FileNotFoundError on import."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        pytest.skip(f"llama-cpp-python is not usable here: {e}")
    return llama_cpp


def test_llama_cpp_agrees(tiny_gguf, hearth_llm):
    llama_cpp = import_llama_cpp()
    from hearth.tokenizer import load_tokenizer

    path, _, _ = tiny_gguf
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    text = "Hello world, the quick brown fox jumps over 12 lazy dogs."
    assert llm.tokenize(text.encode(), add_bos=False) == load_tokenizer(path).encode(text, add_special_tokens=False)
    llm.eval(PROMPT)
    theirs = torch.tensor(np.array(llm.scores[: len(PROMPT)]))
    ours = prefill_logits(hearth_llm.engine.runner.model, torch.tensor(PROMPT))
    # llama.cpp quantizes activations to Q8_0 for its Q4_0 dot products: close, not equal
    assert (ours - theirs).abs().max().item() < 0.03  # measured 0.005
