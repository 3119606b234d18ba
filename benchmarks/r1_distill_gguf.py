"""DeepSeek-R1-Distill-Qwen-1.5B's shapes with random weights, written as a Q4_0 GGUF, and Hearth against llama.cpp
on that file in the same run (issue 6).

The file is arch `qwen2` at full depth (docs/models.md §3: hidden 1536, 28 layers, 12 heads over 2 KV heads, head_dim 128,
intermediate 8960, vocab 151936, rope_theta 1e4, rms eps 1e-6, q/k/v biases, untied output). Weights are normal with
a fixed seed and std 0.02 (norm gains 1 + 0.02·N), so activations stay in range over 28 layers. Linear weights and
token_embd are Q4_0 (gguf.quants), output is Q8_0 by default (llama-quantize gives a Q4_0 file a Q6_K output, which
gguf-py cannot write; `--output-type Q4_0` makes the file pure Q4_0), norms and biases F32.

The tokenizer is byte-level BPE ("gpt2", pre-tokenizer "deepseek-r1-qwen") that llama.cpp and Hearth both read:
the 256 byte tokens spelled through GPT-2's bytes_to_unicode, then merges drawn at random (letters after a space or
a letter, so English text does merge) where each merge joins two tokens already in the vocabulary, up to id 151642;
then R1-Distill-Qwen's special tokens at their ids (docs/models.md §2.6) and `[PADn]` fillers up to 151936, as llama.cpp's
converter pads. The chat template is an R1-style one written from docs/models.md §2.6 (no tools).

    python benchmarks/r1_distill_gguf.py                       # write .bench/r1-distill-qwen-1.5b-random.Q4_0.gguf
    python benchmarks/r1_distill_gguf.py --bench --out-json bench.jsonl   # write if missing, then Hearth vs llama.cpp

`--bench` prints the JSON record of hearth.bench.run_bench (the same as `hearth bench FILE --vs llama.cpp --json`);
an existing file is reused unless `--force`. Measure on a quiet machine: llama.cpp's threads wait for each other at
every op, so when another process takes one of the 2 cores its decode collapses (0.4 tok/s seen under load, against
about 20 tok/s on 1 thread in the same minutes), far more than Hearth's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants

DEFAULT_OUT = ".bench/r1-distill-qwen-1.5b-random.Q4_0.gguf"
QUANT_TYPES = {"Q4_0": GGMLQuantizationType.Q4_0, "Q8_0": GGMLQuantizationType.Q8_0}
ROWS_PER_CHUNK = 4096  # rows quantized at a time (row-local formats: the bytes do not depend on it)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# R1-Distill-Qwen's added tokens from id 151643 (docs/models.md §2.6; <|EOT|> at 151647 is from memory)
SPECIAL_TOKENS = [
    (EOS, TokenType.CONTROL),
    ("<｜User｜>", TokenType.CONTROL),
    ("<｜Assistant｜>", TokenType.CONTROL),
    (BOS, TokenType.CONTROL),
    ("<|EOT|>", TokenType.CONTROL),
    ("<think>", TokenType.USER_DEFINED),
    ("</think>", TokenType.USER_DEFINED),
]
NUM_BPE_TOKENS = 151643  # bytes + merges before the first special token in the real vocabulary

# R1-style chat template (docs/models.md §2.6): system prompts first with no role tag, <｜User｜>/<｜Assistant｜> turns,
# past reasoning dropped, and a generation prompt that opens a thought.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' + (m['content'] or '').split('</think>')[-1] + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\n' -}}{%- endif -%}"
)


@dataclass(frozen=True, slots=True)
class Qwen2Shape:
    hidden_size: int = 1536
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 8960
    vocab_size: int = 151936
    max_position_embeddings: int = 131072
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


R1_DISTILL_QWEN_1_5B = Qwen2Shape()


# ---------------------------------------------------------------------------------------------------- tokenizer


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character each byte is spelled with, indexed by byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def random_merges(num_merges: int, seed: int) -> list[tuple[str, str]]:
    """`num_merges` BPE merges (left, right) in rank order; both sides exist before each merge, each result is new.

    A merge extends a word start (a space, half the time, or a letter) or an earlier merge result (early, short ones
    more often) by a letter (English frequencies) or, now and then, by any byte: English text then splits into
    multi-byte tokens, as with a trained vocabulary."""
    alphabet = byte_alphabet()
    letters = [alphabet[b] for b in b"etaoinshrdlcumwfgypbvkjxqz"]
    letter_p = 1 / np.arange(1, 27)
    letter_p /= letter_p.sum()
    capitals = [alphabet[b] for b in b"ETAOINSHRDLCUMWFGYPBVKJXQZ"]
    starts = [alphabet[ord(" ")]] * 52 + letters + capitals
    rng = np.random.default_rng([seed, 1])
    known, grown, merges = set(alphabet), [], []
    while len(merges) < num_merges:
        n = 4096
        draws = zip(rng.random(n), rng.random(n), rng.choice(letters, n, p=letter_p), rng.integers(0, 256, n))
        for c, p, rl, rb in draws:
            left = starts[int(p * len(starts))] if c < 0.2 or not grown else grown[int(p**2 * len(grown))]
            right = alphabet[rb] if c > 0.97 else str(rl)
            if left + right in known or len(left) >= 16:
                continue
            known.add(left + right)
            grown.append(left + right)
            merges.append((left, right))
            if len(merges) == num_merges:
                break
    return merges


@dataclass(slots=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int


def build_vocab(vocab_size: int, seed: int = 0) -> Vocab:
    """Byte tokens, random merges, R1-Distill-Qwen's special tokens, then `[PADn]` fillers: `vocab_size` tokens."""
    num_bpe = min(NUM_BPE_TOKENS, vocab_size - len(SPECIAL_TOKENS))
    if num_bpe < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for 256 byte tokens and {len(SPECIAL_TOKENS)} specials")
    merges = random_merges(num_bpe - 256, seed)
    tokens = sorted(byte_alphabet()) + [left + right for left, right in merges]
    types = [int(TokenType.NORMAL)] * num_bpe
    for text, kind in SPECIAL_TOKENS:
        tokens.append(text)
        types.append(int(kind))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    return Vocab(tokens, types, [f"{a} {b}" for a, b in merges], bos_id=tokens.index(BOS), eos_id=tokens.index(EOS))


# ---------------------------------------------------------------------------------------------------- weights


TensorSpec = tuple[str, tuple[int, ...], GGMLQuantizationType]  # GGUF name, torch-order shape, type


def tensor_plan(shape: Qwen2Shape, embed_type: str = "Q4_0", output_type: str = "Q8_0") -> list[TensorSpec]:
    """Every tensor of the file, in llama.cpp's converter order."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    F32, Q4_0 = GGMLQuantizationType.F32, GGMLQuantizationType.Q4_0
    plan = [("token_embd.weight", (shape.vocab_size, h), QUANT_TYPES[embed_type])]
    for i in range(shape.num_hidden_layers):
        block = [("attn_norm.weight", (h,), F32), ("attn_q.weight", (q_dim, h), Q4_0), ("attn_q.bias", (q_dim,), F32),
                 ("attn_k.weight", (kv_dim, h), Q4_0), ("attn_k.bias", (kv_dim,), F32),
                 ("attn_v.weight", (kv_dim, h), Q4_0), ("attn_v.bias", (kv_dim,), F32),
                 ("attn_output.weight", (h, q_dim), Q4_0), ("ffn_norm.weight", (h,), F32),
                 ("ffn_gate.weight", (inter, h), Q4_0), ("ffn_up.weight", (inter, h), Q4_0),
                 ("ffn_down.weight", (h, inter), Q4_0)]  # fmt: skip
        plan += [(f"blk.{i}.{name}", dims, qtype) for name, dims, qtype in block]
    plan += [("output_norm.weight", (h,), F32), ("output.weight", (shape.vocab_size, h), QUANT_TYPES[output_type])]
    return plan


def random_weight(name: str, dims: tuple[int, ...], seed: int = 0, std: float = 0.02) -> np.ndarray:
    """The float32 values of tensor `name`: N(0, std), or 1 + N(0, std) for norm gains; seeded by (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    w = rng.standard_normal(dims, dtype=np.float32)
    w *= np.float32(std)
    if name.endswith("norm.weight"):
        w += np.float32(1.0)
    return w


def stored_nbytes(dims: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    if qtype == GGMLQuantizationType.F32:
        return 4 * int(np.prod(dims))
    return int(np.prod(quants.quant_shape_to_byte_shape(dims, qtype)))


def encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes stored for `w`: itself for F32, else gguf.quants blocks, a chunk of rows at a time (row-local)."""
    if qtype == GGMLQuantizationType.F32:
        return w
    out = np.empty(quants.quant_shape_to_byte_shape(w.shape, qtype), dtype=np.uint8)
    for start in range(0, w.shape[0], ROWS_PER_CHUNK):
        out[start : start + ROWS_PER_CHUNK] = quants.quantize(w[start : start + ROWS_PER_CHUNK], qtype)
    return out


def write_random_gguf(path: str, shape: Qwen2Shape = R1_DISTILL_QWEN_1_5B, seed: int = 0, std: float = 0.02,
                      embed_type: str = "Q4_0", output_type: str = "Q8_0", log=None) -> dict:  # fmt: skip
    """Write a random-weight qwen2 GGUF with `shape` to `path`; returns a summary (tensors, parameters, bytes)."""
    start = time.perf_counter()
    plan = tensor_plan(shape, embed_type, output_type)
    vocab = build_vocab(shape.vocab_size, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    w = GGUFWriter(tmp, "qwen2")
    w.add_name(f"R1-Distill-Qwen-shaped random (seed {seed}, std {std})")
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(2)
    w.add_context_length(shape.max_position_embeddings)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    if shape.head_dim * shape.num_attention_heads != shape.hidden_size:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-r1-qwen")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_pad_token_id(vocab.eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    return write_tensors(
        w, plan, lambda name, dims, qtype: encode(random_weight(name, dims, seed, std), qtype), path, start, log
    )


def write_tensors(w: GGUFWriter, plan: list[TensorSpec], data, path: str, start: float, log=None,
                  every: int = 24) -> dict:  # fmt: skip
    """Finish a GGUFWriter opened on `path + ".partial"` whose metadata is set: the tensor infos, then each tensor's
    bytes from `data(name, dims, qtype)` streamed one at a time, then the file renamed into place. Returns a summary
    (tensors, parameters, bytes, seconds since `start`)."""
    for name, dims, qtype in plan:
        w.add_tensor_info(name, dims, np.dtype(np.float32), stored_nbytes(dims, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, dims, qtype) in enumerate(plan):
        w.write_tensor_data(data(name, dims, qtype))
        if log and (i % every == 0 or i == len(plan) - 1):
            log(f"  {i + 1}/{len(plan)} tensors, {time.perf_counter() - start:.0f} s")
    w.close()
    os.replace(path + ".partial", path)
    return {"path": path, "tensors": len(plan), "parameters": sum(int(np.prod(d)) for _, d, _ in plan),
            "file_bytes": os.path.getsize(path), "write_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def bench_file(path: str, peers: list[str], args, desc: str, int8_prefill: bool = False) -> int:
    """Hearth against `peers` on `path` (hearth.bench.run_bench); prints the JSON record, appends it to
    args.out_json when given."""
    from hearth.bench import run_bench

    record = run_bench(path, peers, args.prompt_len, args.decode_len, args.repeat, threads=args.threads,
                       int8_prefill=int8_prefill)  # fmt: skip
    record["model_desc"] = desc
    line = json.dumps(record)
    print(line)
    if args.out_json:
        with open(args.out_json, "a") as f:
            f.write(line + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the GGUF file (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite the file even if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="weight standard deviation (default 0.02)")
    parser.add_argument("--embed-type", choices=QUANT_TYPES, default="Q4_0", help="token_embd type (default Q4_0)")
    parser.add_argument("--output-type", choices=QUANT_TYPES, default="Q8_0", help="output type (default Q8_0)")
    parser.add_argument("--bench", action="store_true", help="then run Hearth against llama.cpp on the file")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads for both runtimes (default: physical cores)")
    parser.add_argument("--int8-prefill", action="store_true", help="Hearth prefills with int8 activations")
    parser.add_argument("--out-json", help="append the benchmark's JSON line to this file")
    args = parser.parse_args(argv)

    if args.force or not os.path.isfile(args.out):
        print(f"writing {args.out}", file=sys.stderr)
        summary = write_random_gguf(args.out, seed=args.seed, std=args.std, embed_type=args.embed_type,
                                    output_type=args.output_type, log=lambda s: print(s, file=sys.stderr))  # fmt: skip
        print(json.dumps(summary), file=sys.stderr)
    if not args.bench:
        return 0
    desc = "R1-Distill-Qwen-1.5B shapes, random weights, Q4_0 (written by benchmarks/r1_distill_gguf.py)"
    return bench_file(args.out, ["llama.cpp"], args, desc, int8_prefill=args.int8_prefill)


if __name__ == "__main__":
    sys.exit(main())
