"""A DeepSeek-V3-architecture MoE at DeepSeek-V2-Lite's shape (15.7B parameters) with random weights, written as a
GGUF the way llama.cpp's converter lays out arch `deepseek2`, and Hearth against llama.cpp on that file.

Shape: 27 layers (llama.cpp decides a deepseek2 file has no q_lora from this depth, so keep 27), hidden 2048, 16
heads, no q_lora, MLA with kv_lora_rank 512, nope 128 + rope 64, v 128; layer 0 dense (FFN 10944), the others 64
routed experts of FFN 1408 plus 2 shared, 6 per token, sigmoid routing with a correction bias (V3's rule,
`expert_gating_func` 2; `--gating softmax` writes V2's), YaRN factor 40 over 4096, vocabulary 102400.

Layout (docs/models.md §4.1): `kv_b` split into `attn_k_b` [H, c, nope] and `attn_v_b` [H, v, c]; `head_count_kv` 1,
`key_length` c + rope and `value_length` c, with the per-head sizes in `key_length_mla` / `value_length_mla`;
router weight and correction bias (`exp_probs_b`) F32; norms F32; every other matrix in the chosen type (Q8_0 or
Q4_0); at depths other than 26/27 also `q_lora_rank` 0, which llama.cpp reads there. Quantized blocks are random
bytes under an f16 scale chosen so values are about N(0, 0.02) in size: nothing is quantized, so the file is written
at disk speed. `--unambiguous-routing` adds +8 to the correction bias of a
fixed 6 experts per layer so the routing cannot flip between engines (the cross-engine logit check).

    python benchmarks/deepseek_moe.py                     # write .bench/deepseek-v2-lite-shape-random.Q8_0.gguf
    python benchmarks/deepseek_moe.py --type Q4_0         # the Q4_0 file
    python benchmarks/deepseek_moe.py --bench --vs llama.cpp --out-json bench.jsonl
    python benchmarks/deepseek_moe.py --layers 2 --out .bench/ds-2l.gguf     # same layout, two layers
    python benchmarks/deepseek_moe.py --layers 2 --unambiguous-routing --out .bench/ds-2l-u.gguf --check-logits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, replace

import numpy as np
from cross_engine_logits import check_logits
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType, quants
from r1_distill_gguf import CHAT_TEMPLATE, bench_file, byte_alphabet, random_merges, stored_nbytes, write_tensors

F32 = GGMLQuantizationType.F32
QUANT_TYPES = {"Q8_0": GGMLQuantizationType.Q8_0, "Q4_0": GGMLQuantizationType.Q4_0}
FILE_TYPES = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0}
# f16 block scale so that random codes give values of about 0.02: Q8_0 codes are uniform in [-128, 127]
# (std ≈ 74), Q4_0 codes (n - 8) uniform in [-8, 7] (std ≈ 4.6)
BLOCK_SCALE = {"Q8_0": 0.02 / 74, "Q4_0": 0.02 / 4.6}
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
FIRST_SPECIAL = 100000
LITE_DEPTHS = (26, 27)  # depths at which llama.cpp assumes a deepseek2 file has no q_lora (and reads no rank)


@dataclass(frozen=True, slots=True)
class DeepseekShape:
    hidden_size: int = 2048
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    dense_layers: int = 1
    dense_ffn: int = 10944
    num_experts: int = 64
    num_shared_experts: int = 2
    experts_per_token: int = 6
    expert_ffn: int = 1408
    vocab_size: int = 102400
    context_length: int = 163840
    original_context_length: int = 4096
    yarn_factor: float = 40.0
    rope_theta: float = 10000.0
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6


V2_LITE_SHAPE = DeepseekShape()
TensorSpec = tuple[str, tuple[int, ...], GGMLQuantizationType]


def tensor_plan(shape: DeepseekShape, qtype: GGMLQuantizationType) -> list[TensorSpec]:
    h, heads, c = shape.hidden_size, shape.num_attention_heads, shape.kv_lora_rank
    nope, rope, v = shape.qk_nope_head_dim, shape.qk_rope_head_dim, shape.v_head_dim
    e, ff = shape.num_experts, shape.expert_ffn
    shared = shape.num_shared_experts * ff
    plan = [("token_embd.weight", (shape.vocab_size, h), qtype)]
    for i in range(shape.num_hidden_layers):
        block = [("attn_norm.weight", (h,), F32),
                 ("attn_q.weight", (heads * (nope + rope), h), qtype),
                 ("attn_kv_a_mqa.weight", (c + rope, h), qtype),
                 ("attn_kv_a_norm.weight", (c,), F32),
                 ("attn_k_b.weight", (heads, c, nope), qtype),
                 ("attn_v_b.weight", (heads, v, c), qtype),
                 ("attn_output.weight", (h, heads * v), qtype),
                 ("ffn_norm.weight", (h,), F32)]  # fmt: skip
        if i < shape.dense_layers:
            block += [("ffn_gate.weight", (shape.dense_ffn, h), qtype), ("ffn_up.weight", (shape.dense_ffn, h), qtype),
                      ("ffn_down.weight", (h, shape.dense_ffn), qtype)]  # fmt: skip
        else:
            block += [("ffn_gate_inp.weight", (e, h), F32), ("exp_probs_b.bias", (e,), F32),
                      ("ffn_gate_exps.weight", (e, ff, h), qtype), ("ffn_up_exps.weight", (e, ff, h), qtype),
                      ("ffn_down_exps.weight", (e, h, ff), qtype),
                      ("ffn_gate_shexp.weight", (shared, h), qtype), ("ffn_up_shexp.weight", (shared, h), qtype),
                      ("ffn_down_shexp.weight", (h, shared), qtype)]  # fmt: skip
        plan += [(f"blk.{i}.{name}", dims, t) for name, dims, t in block]
    plan += [("output_norm.weight", (h,), F32), ("output.weight", (shape.vocab_size, h), qtype)]
    return plan


def random_tensor(name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType, type_name: str, seed: int,
                  favoured: list[int]) -> np.ndarray:  # fmt: skip
    """Stored bytes (quantized types: random codes under a fixed f16 scale) or float32 values, seeded by name."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if qtype != F32:
        block_bytes = quants.GGML_QUANT_SIZES[qtype][1]
        blocks = np.frombuffer(rng.bytes(stored_nbytes(dims, qtype)), dtype=np.uint8).copy().reshape(-1, block_bytes)
        blocks[:, :2] = np.frombuffer(np.float16(BLOCK_SCALE[type_name]).tobytes(), dtype=np.uint8)
        return blocks.reshape(quants.quant_shape_to_byte_shape(dims, qtype))
    w = rng.standard_normal(dims, dtype=np.float32)
    w *= np.float32(0.02)
    if name.endswith("norm.weight"):
        w += np.float32(1.0)
    if name.endswith("exp_probs_b.bias") and favoured:
        w[favoured] += np.float32(8.0)
    return w


def build_vocab(vocab_size: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    num_bpe = min(FIRST_SPECIAL, vocab_size - len(SPECIALS))
    merges = random_merges(num_bpe - 256, seed)
    tokens = sorted(byte_alphabet()) + [left + right for left, right in merges]
    types = [int(TokenType.NORMAL)] * len(tokens)
    for text in SPECIALS:
        tokens.append(text)
        types.append(int(TokenType.CONTROL if "｜" in text else TokenType.USER_DEFINED))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_random_gguf(path: str, shape: DeepseekShape = V2_LITE_SHAPE, type_name: str = "Q8_0", seed: int = 0,
                      gating: str = "sigmoid", unambiguous_routing: bool = False, log=None) -> dict:  # fmt: skip
    start = time.perf_counter()
    qtype = QUANT_TYPES[type_name]
    plan = tensor_plan(shape, qtype)
    tokens, types, merges = build_vocab(shape.vocab_size, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = GGUFWriter(path + ".partial", "deepseek2")
    w.add_name(f"DeepSeek-V3-architecture MoE at V2-Lite's shape, random (seed {seed})")
    w.add_file_type(FILE_TYPES[type_name])
    w.add_quantization_version(2)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_feed_forward_length(shape.dense_ffn)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_key_length(shape.kv_lora_rank + shape.qk_rope_head_dim)
    w.add_value_length(shape.kv_lora_rank)
    w.add_key_length_mla(shape.qk_nope_head_dim + shape.qk_rope_head_dim)
    w.add_value_length_mla(shape.v_head_dim)
    w.add_kv_lora_rank(shape.kv_lora_rank)
    if shape.num_hidden_layers not in LITE_DEPTHS:  # llama.cpp reads q_lora_rank at other depths; 0 means none
        w.add_q_lora_rank(0)
    w.add_rope_dimension_count(shape.qk_rope_head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_leading_dense_block_count(shape.dense_layers)
    w.add_expert_count(shape.num_experts)
    w.add_expert_used_count(shape.experts_per_token)
    w.add_expert_shared_count(shape.num_shared_experts)
    w.add_expert_feed_forward_length(shape.expert_ffn)
    w.add_expert_weights_scale(shape.routed_scaling_factor)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(1)
    w.add_expert_group_used_count(1)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(shape.yarn_factor)
    w.add_rope_scaling_orig_ctx_len(shape.original_context_length)
    w.add_rope_scaling_yarn_log_mul(0.1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(SPECIALS[0]))
    w.add_eos_token_id(tokens.index(SPECIALS[1]))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    favoured_rng = np.random.default_rng([seed, 7])

    def data(name: str, dims: tuple[int, ...], t: GGMLQuantizationType) -> np.ndarray:
        favoured = []
        if unambiguous_routing and name.endswith("exp_probs_b.bias"):
            favoured = sorted(favoured_rng.choice(shape.num_experts, shape.experts_per_token, replace=False).tolist())
        return random_tensor(name, dims, t, type_name, seed, favoured)

    return write_tensors(w, plan, data, path, start, log, every=40)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", choices=QUANT_TYPES, default="Q8_0", help="type of every matrix (default Q8_0)")
    parser.add_argument("--out", help="the GGUF file (default .bench/deepseek-v2-lite-shape-random.TYPE.gguf)")
    parser.add_argument("--force", action="store_true", help="rewrite the file even if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="fewer layers than 27 (the file then says q_lora_rank 0)")
    parser.add_argument("--gating", choices=("sigmoid", "softmax"), default="sigmoid")
    parser.add_argument("--unambiguous-routing", action="store_true", help="+8 correction bias on 6 experts a layer")
    parser.add_argument("--bench", action="store_true", help="then run Hearth against the peers on the file")
    parser.add_argument("--vs", nargs="*", default=["llama.cpp"], help="peers (default llama.cpp; none: Hearth alone)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out-json", help="append the benchmark's JSON line to this file")
    parser.add_argument("--check-logits", action="store_true",
                        help="compare Hearth's first-step and decode-step logits with llama.cpp's on the file (use "
                             "with --unambiguous-routing and a small --layers), print JSON")  # fmt: skip
    args = parser.parse_args(argv)

    out = args.out or f".bench/deepseek-v2-lite-shape-random.{args.type}.gguf"
    shape = V2_LITE_SHAPE if args.layers is None else replace(V2_LITE_SHAPE, num_hidden_layers=args.layers)
    if args.force or not os.path.isfile(out):
        print(f"writing {out}", file=sys.stderr)
        summary = write_random_gguf(out, shape, args.type, args.seed, args.gating, args.unambiguous_routing,
                                    log=lambda s: print(s, file=sys.stderr))  # fmt: skip
        print(json.dumps(summary), file=sys.stderr)
    if args.check_logits:
        record = check_logits(out, threads=args.threads, seed=args.seed, max_id=FIRST_SPECIAL)
        print(json.dumps(record))
        if args.out_json:
            with open(args.out_json, "a") as f:
                f.write(json.dumps(record) + "\n")
    if not args.bench:
        return 0
    desc = f"DeepSeek-V3 architecture at V2-Lite's shape ({shape.num_hidden_layers} layers), {args.type}"
    return bench_file(out, args.vs, args, desc)


if __name__ == "__main__":
    sys.exit(main())
