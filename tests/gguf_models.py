"""Tiny whole-model GGUF files written with gguf.GGUFWriter from a (metadata, tensors) spec that tests can mutate
before writing: a Llama, a gpt-oss (sliding window, experts, YaRN, a 131072-token context) and a DeepSeek-V2-Lite-like
deepseek2 (MLA, dense then MoE layers, a 163840-token context); and `write_mxfp4_gpt_oss`, the gpt-oss with its experts in
MXFP4 as llama.cpp's converter writes them."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

V = GGUFValueType


def llama_spec() -> tuple[str, list[tuple[str, object, GGUFValueType]], dict[str, np.ndarray]]:
    hidden, heads, kv, ff, layers, vocab = 32, 4, 2, 64, 2, 64
    hd = hidden // heads
    kvs = [("llama.block_count", layers, V.UINT32), ("llama.context_length", 256, V.UINT32),
           ("llama.embedding_length", hidden, V.UINT32), ("llama.feed_forward_length", ff, V.UINT32),
           ("llama.attention.head_count", heads, V.UINT32), ("llama.attention.head_count_kv", kv, V.UINT32),
           ("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32), ("llama.rope.freq_base", 10000.0, V.FLOAT32),
           ("llama.rope.dimension_count", hd, V.UINT32), ("llama.vocab_size", vocab, V.UINT32)]  # fmt: skip
    kvs += tokenizer_kvs(vocab)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv * hd, hidden),
                   f"blk.{i}.attn_v.weight": (kv * hd, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ff)}  # fmt: skip
    return "llama", kvs, {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def gpt_oss_spec() -> tuple[str, list[tuple[str, object, GGUFValueType]], dict[str, np.ndarray]]:
    hidden, heads, kv, hd, ff, layers, vocab, experts = 32, 4, 2, 8, 16, 2, 64, 4
    a = "gpt-oss"
    kvs = [(f"{a}.block_count", layers, V.UINT32), (f"{a}.context_length", 131072, V.UINT32),
           (f"{a}.embedding_length", hidden, V.UINT32), (f"{a}.feed_forward_length", ff, V.UINT32),
           (f"{a}.expert_feed_forward_length", ff, V.UINT32), (f"{a}.attention.head_count", heads, V.UINT32),
           (f"{a}.attention.head_count_kv", kv, V.UINT32), (f"{a}.attention.key_length", hd, V.UINT32),
           (f"{a}.attention.value_length", hd, V.UINT32), (f"{a}.attention.sliding_window", 8, V.UINT32),
           (f"{a}.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32), (f"{a}.rope.freq_base", 150000.0, V.FLOAT32),
           (f"{a}.rope.scaling.type", "yarn", V.STRING), (f"{a}.rope.scaling.factor", 32.0, V.FLOAT32),
           (f"{a}.rope.scaling.original_context_length", 4096, V.UINT32), (f"{a}.expert_count", experts, V.UINT32),
           (f"{a}.expert_used_count", 2, V.UINT32)]  # fmt: skip
    kvs += tokenizer_kvs(vocab)
    rng = np.random.default_rng(1)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hidden,), b + "post_attention_norm.weight": (hidden,),
                   b + "attn_q.weight": (heads * hd, hidden), b + "attn_q.bias": (heads * hd,),
                   b + "attn_k.weight": (kv * hd, hidden), b + "attn_k.bias": (kv * hd,),
                   b + "attn_v.weight": (kv * hd, hidden), b + "attn_v.bias": (kv * hd,),
                   b + "attn_output.weight": (hidden, heads * hd), b + "attn_output.bias": (hidden,),
                   b + "attn_sinks.weight": (heads,), b + "ffn_gate_inp.weight": (experts, hidden),
                   b + "ffn_gate_inp.bias": (experts,), b + "ffn_gate_exps.weight": (experts, ff, hidden),
                   b + "ffn_gate_exps.bias": (experts, ff), b + "ffn_up_exps.weight": (experts, ff, hidden),
                   b + "ffn_up_exps.bias": (experts, ff), b + "ffn_down_exps.weight": (experts, hidden, ff),
                   b + "ffn_down_exps.bias": (experts, hidden)}  # fmt: skip
    return a, kvs, {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def deepseek2_spec() -> tuple[str, list[tuple[str, object, GGUFValueType]], dict[str, np.ndarray]]:
    """DeepSeek-V2-Lite's layout in small: MLA without q_lora, one dense layer then MoE with a shared expert."""
    hidden, heads, c, rope, nope, v, ff, moe_ff, experts, vocab = 32, 2, 16, 8, 8, 8, 32, 16, 4, 64
    a = "deepseek2"
    kvs = [(f"{a}.block_count", 2, V.UINT32), (f"{a}.context_length", 163840, V.UINT32),
           (f"{a}.embedding_length", hidden, V.UINT32), (f"{a}.feed_forward_length", ff, V.UINT32),
           (f"{a}.attention.head_count", heads, V.UINT32), (f"{a}.attention.head_count_kv", 1, V.UINT32),
           (f"{a}.attention.key_length", c + rope, V.UINT32), (f"{a}.attention.value_length", c, V.UINT32),
           (f"{a}.attention.key_length_mla", nope + rope, V.UINT32), (f"{a}.attention.value_length_mla", v, V.UINT32),
           (f"{a}.attention.layer_norm_rms_epsilon", 1e-6, V.FLOAT32), (f"{a}.rope.freq_base", 10000.0, V.FLOAT32),
           (f"{a}.rope.dimension_count", rope, V.UINT32), (f"{a}.rope.scaling.type", "yarn", V.STRING),
           (f"{a}.rope.scaling.factor", 40.0, V.FLOAT32), (f"{a}.rope.scaling.original_context_length", 4096, V.UINT32),
           (f"{a}.rope.scaling.yarn_log_multiplier", 0.0707, V.FLOAT32), (f"{a}.attention.kv_lora_rank", c, V.UINT32),
           (f"{a}.leading_dense_block_count", 1, V.UINT32), (f"{a}.expert_feed_forward_length", moe_ff, V.UINT32),
           (f"{a}.expert_count", experts, V.UINT32), (f"{a}.expert_used_count", 2, V.UINT32),
           (f"{a}.expert_shared_count", 1, V.UINT32), (f"{a}.expert_group_count", 1, V.UINT32),
           (f"{a}.expert_group_used_count", 1, V.UINT32), (f"{a}.expert_weights_scale", 1.0, V.FLOAT32),
           (f"{a}.expert_weights_norm", True, V.BOOL)]  # fmt: skip
    kvs += tokenizer_kvs(vocab)
    rng = np.random.default_rng(2)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(2):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
                   b + "attn_q.weight": (heads * (nope + rope), hidden), b + "attn_kv_a_mqa.weight": (c + rope, hidden),
                   b + "attn_kv_a_norm.weight": (c,), b + "attn_kv_b.weight": (heads * (nope + v), c),
                   b + "attn_output.weight": (hidden, heads * v)}  # fmt: skip
    shapes |= {"blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
               "blk.0.ffn_down.weight": (hidden, ff), "blk.1.ffn_gate_inp.weight": (experts, hidden),
               "blk.1.exp_probs_b.bias": (experts,), "blk.1.ffn_gate_exps.weight": (experts, moe_ff, hidden),
               "blk.1.ffn_up_exps.weight": (experts, moe_ff, hidden),
               "blk.1.ffn_down_exps.weight": (experts, hidden, moe_ff), "blk.1.ffn_gate_shexp.weight": (moe_ff, hidden),
               "blk.1.ffn_up_shexp.weight": (moe_ff, hidden), "blk.1.ffn_down_shexp.weight": (hidden, moe_ff)}  # fmt: skip
    return a, kvs, {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def tokenizer_kvs(vocab: int) -> list[tuple[str, object, GGUFValueType]]:
    tokens = ["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 2)]
    return [("tokenizer.ggml.model", "gpt2", V.STRING), ("tokenizer.ggml.tokens", tokens, V.ARRAY),
            ("tokenizer.ggml.token_type", [3, 3] + [1] * (vocab - 2), V.ARRAY),
            ("tokenizer.ggml.bos_token_id", 0, V.UINT32), ("tokenizer.ggml.eos_token_id", 1, V.UINT32),
            ("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}", V.STRING)]  # fmt: skip


def write_model(path, arch: str, kvs, tensors, split_max_tensors: int = 0) -> bytes:
    """Write the model to `path`; with `split_max_tensors`, as llama.cpp's split parts (PATH-0000i-of-0000N.gguf, at
    most that many tensors each) instead, and return the first part's bytes."""
    writer = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    for key, value, vtype in kvs:
        sub = None
        if vtype == V.ARRAY:
            sub = V.STRING if isinstance(value[0], str) else V.INT32
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0].read_bytes()
    return path.read_bytes()


MXFP4_FF = 32  # a multiple of MXFP4's 32-value blocks, so down's input can be MXFP4 too


def write_mxfp4_gpt_oss(path) -> None:
    """gpt_oss_spec's model with expert FFN 32 and its expert weights in MXFP4, as llama.cpp's converter writes them."""
    arch, kvs, tensors = gpt_oss_spec()
    kvs = [(k, MXFP4_FF if k.endswith("feed_forward_length") else v, t) for k, v, t in kvs]
    rng = np.random.default_rng(5)
    writer = GGUFWriter(str(path), arch)
    for key, value, vtype in kvs:
        sub = (V.STRING if isinstance(value[0], str) else V.INT32) if vtype == V.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in tensors.items():
        experts, hidden = array.shape[0], tensors["token_embd.weight"].shape[1]
        if "_exps.weight" in name:
            shape = (experts, hidden, MXFP4_FF) if "down" in name else (experts, MXFP4_FF, hidden)
            w = rng.standard_normal(shape).astype(np.float32) * 0.5
            writer.add_tensor(name, quantize(w, GGMLQuantizationType.MXFP4), raw_dtype=GGMLQuantizationType.MXFP4)
        elif "_exps.bias" in name and "down" not in name:
            writer.add_tensor(name, (rng.standard_normal((experts, MXFP4_FF)) * 0.1).astype(np.float32))
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
