"""gpt-oss-20b's shapes with random weights, written as a GGUF exactly as llama.cpp's converter lays gpt-oss out,
and Hearth against llama.cpp on that file in the same run.

Layout (docs/models.md §1.1, §4.1): arch `gpt-oss`, file type MOSTLY_MXFP4_MOE; experts `ffn_{gate,up,down}_exps`
in MXFP4 with gate and up stored separately ([E, FF, H] and [E, H, FF]), their biases F32 [E, FF] / [E, H];
embedding, LM head and attention projections BF16; router weight and bias, sinks, norms and attention biases F32;
YaRN metadata (factor 32 over 4096, theta 150000) and a 128-token window on even layers.

Weights are random: BF16 tensors are N(0, 0.02) rounded toward zero to bf16, MXFP4 blocks are random nibbles under a
scale of 2^-7 (values of the same size), norm gains 1 + N(0, 0.02). Nothing is quantized, so the 13.8 GB file is
written at disk speed. `--unambiguous-routing` adds +8 to the router bias of a fixed 4 experts per layer, so two
engines' rounding differences cannot flip the routing (for a cross-engine logit check).

The tokenizer is byte-level BPE with pre-tokenizer `gpt-4o` (o200k's split), 201,088 ids: bytes and random merges
up to id 199997, then the harmony specials at their ids (`<|return|>` 200002, `<|channel|>` 200005, `<|start|>`
200006, `<|end|>` 200007, `<|message|>` 200008, `<|call|>` 200012, ...) and reserved fillers.

    python benchmarks/gpt_oss_20b.py                     # write .bench/gpt-oss-20b-random.gguf (13.8 GB)
    python benchmarks/gpt_oss_20b.py --bench --out-json bench.jsonl --vs llama.cpp
    python benchmarks/gpt_oss_20b.py --layers 2 --out .bench/gpt-oss-2l.gguf   # a small file of the same layout

`--bench` prints the JSON record of hearth.bench.run_bench: on a file this size the engines run in turn, each loaded
anew every round and never resident together (its sequential mode), so load time and peak memory are compared too.
An existing file is reused unless `--force`.
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
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType, TokenType, quants
from r1_distill_gguf import bench_file, byte_alphabet, random_merges, stored_nbytes, write_tensors

DEFAULT_OUT = ".bench/gpt-oss-20b-random.gguf"
F32, BF16, MXFP4 = GGMLQuantizationType.F32, GGMLQuantizationType.BF16, GGMLQuantizationType.MXFP4
MXFP4_SCALE = 127 - 7  # e8m0 exponent of every block: values up to 6 · 2^-7

# harmony's special tokens at their o200k_harmony ids (docs/models.md §1.7); the rest of 199998..201087 is reserved
FIRST_SPECIAL = 199998
HARMONY_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    200018: "<|endofprompt|>",
}  # fmt: skip
BOS_ID, EOS_ID, PAD_ID = 199998, 200002, 199999


@dataclass(frozen=True, slots=True)
class GptOssShape:
    hidden_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    expert_ffn: int = 2880
    vocab_size: int = 201088
    context_length: int = 131072
    original_context_length: int = 4096
    sliding_window: int = 128
    rope_theta: float = 150000.0
    yarn_factor: float = 32.0
    rms_norm_eps: float = 1e-5


GPT_OSS_20B = GptOssShape()

TensorSpec = tuple[str, tuple[int, ...], GGMLQuantizationType]  # GGUF name, numpy-order shape, type


def tensor_plan(shape: GptOssShape) -> list[TensorSpec]:
    """Every tensor of the file, in the converter's order."""
    h, e, ff = shape.hidden_size, shape.num_experts, shape.expert_ffn
    q_dim, kv_dim = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    plan = [("token_embd.weight", (shape.vocab_size, h), BF16)]
    for i in range(shape.num_hidden_layers):
        block = [("attn_norm.weight", (h,), F32),
                 ("attn_q.weight", (q_dim, h), BF16), ("attn_q.bias", (q_dim,), F32),
                 ("attn_k.weight", (kv_dim, h), BF16), ("attn_k.bias", (kv_dim,), F32),
                 ("attn_v.weight", (kv_dim, h), BF16), ("attn_v.bias", (kv_dim,), F32),
                 ("attn_output.weight", (h, q_dim), BF16), ("attn_output.bias", (h,), F32),
                 ("attn_sinks.weight", (shape.num_attention_heads,), F32),
                 ("post_attention_norm.weight", (h,), F32),
                 ("ffn_gate_inp.weight", (e, h), F32), ("ffn_gate_inp.bias", (e,), F32),
                 ("ffn_gate_exps.weight", (e, ff, h), MXFP4), ("ffn_gate_exps.bias", (e, ff), F32),
                 ("ffn_up_exps.weight", (e, ff, h), MXFP4), ("ffn_up_exps.bias", (e, ff), F32),
                 ("ffn_down_exps.weight", (e, h, ff), MXFP4), ("ffn_down_exps.bias", (e, h), F32)]  # fmt: skip
        plan += [(f"blk.{i}.{name}", dims, qtype) for name, dims, qtype in block]
    plan += [("output_norm.weight", (h,), F32), ("output.weight", (shape.vocab_size, h), BF16)]
    return plan


def random_tensor(name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType, seed: int, std: float,
                  favoured: list[int]) -> np.ndarray:  # fmt: skip
    """The stored bytes (or float32 values) of tensor `name`, seeded by (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if qtype == MXFP4:
        blocks = np.frombuffer(rng.bytes(stored_nbytes(dims, qtype)), dtype=np.uint8).copy()
        blocks = blocks.reshape(-1, 17)
        blocks[:, 0] = MXFP4_SCALE
        return blocks.reshape(quants.quant_shape_to_byte_shape(dims, qtype))
    w = rng.standard_normal(dims, dtype=np.float32)
    w *= np.float32(std)
    if name.endswith("norm.weight"):
        w += np.float32(1.0)
    if name.endswith("ffn_gate_inp.bias") and favoured:
        w[favoured] += np.float32(8.0)
    if qtype == BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(*dims[:-1], dims[-1] * 2)
    return w


def build_vocab(vocab_size: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """Bytes and random merges up to id 199997, then the harmony specials and reserved fillers."""
    num_bpe = min(FIRST_SPECIAL, vocab_size - 1)
    merges = random_merges(num_bpe - 256, seed)
    tokens = sorted(byte_alphabet()) + [left + right for left, right in merges]
    types = [int(TokenType.NORMAL)] * len(tokens)
    for i in range(len(tokens), vocab_size):
        tokens.append(HARMONY_SPECIALS.get(i, f"<|reserved_{i}|>"))
        types.append(int(TokenType.CONTROL))
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_random_gguf(path: str, shape: GptOssShape = GPT_OSS_20B, seed: int = 0, std: float = 0.02,
                      unambiguous_routing: bool = False, log=None) -> dict:  # fmt: skip
    """Write a random-weight gpt-oss GGUF with `shape` to `path`; returns a summary (tensors, parameters, bytes)."""
    start = time.perf_counter()
    plan = tensor_plan(shape)
    tokens, types, merges = build_vocab(shape.vocab_size, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = GGUFWriter(path + ".partial", "gpt-oss")
    w.add_name(f"gpt-oss-shaped random (seed {seed}, std {std})")
    w.add_file_type(LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(2)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_feed_forward_length(shape.expert_ffn)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_expert_count(shape.num_experts)
    w.add_expert_used_count(shape.experts_per_token)
    w.add_expert_feed_forward_length(shape.expert_ffn)
    w.add_sliding_window(shape.sliding_window)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(shape.yarn_factor)
    w.add_rope_scaling_orig_ctx_len(shape.original_context_length)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
    favoured_rng = np.random.default_rng([seed, 7])

    def data(name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType) -> np.ndarray:
        favoured = []
        if unambiguous_routing and name.endswith("ffn_gate_inp.bias"):
            favoured = sorted(favoured_rng.choice(shape.num_experts, shape.experts_per_token, replace=False).tolist())
        return random_tensor(name, dims, qtype, seed, std, favoured)

    return write_tensors(w, plan, data, path, start, log, every=19)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the GGUF file (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite the file even if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="weight standard deviation (default 0.02)")
    parser.add_argument("--layers", type=int, help="fewer layers than the 20b's 24 (a small file of the same layout)")
    parser.add_argument("--unambiguous-routing", action="store_true", help="+8 router bias on 4 experts per layer")
    parser.add_argument("--bench", action="store_true", help="then run Hearth against the peers on the file")
    parser.add_argument("--vs", nargs="*", default=["llama.cpp"], help="peers (default llama.cpp; none: Hearth alone)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads for every runtime (default: physical cores)")
    parser.add_argument("--out-json", help="append the benchmark's JSON line to this file")
    args = parser.parse_args(argv)

    shape = GPT_OSS_20B if args.layers is None else replace(GPT_OSS_20B, num_hidden_layers=args.layers)
    if args.force or not os.path.isfile(args.out):
        print(f"writing {args.out}", file=sys.stderr)
        summary = write_random_gguf(args.out, shape, seed=args.seed, std=args.std,
                                    unambiguous_routing=args.unambiguous_routing,
                                    log=lambda s: print(s, file=sys.stderr))  # fmt: skip
        print(json.dumps(summary), file=sys.stderr)
    if not args.bench:
        return 0
    desc = f"gpt-oss-20b shapes ({shape.num_hidden_layers} layers), random weights, MXFP4 experts"
    return bench_file(args.out, args.vs, args, desc)


if __name__ == "__main__":
    sys.exit(main())
