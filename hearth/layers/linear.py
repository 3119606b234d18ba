"""Linear layers whose weights load through `weight_loader` and may stay quantized.

Fused projections (qkv, gate_up) collect their shards during loading; `finalize()` joins them and picks how the weight
is held: dense in the compute dtype, or for GGUF weights (bf16 compute dtype) one of
- for the C kernels (hearth/kernels/gguf_cpu.py), Q4_0, Q4_1 and Q8_0 repacked into their row-interleaved form (the
  same bits), other types requantized once to Q8_0 first. Non-fused steps dequantize them to bf16 and run a dense
  matmul (rows padded to at least 16); a model's fused decode step reads them with int8 activations (as llama.cpp
  does);
- without a C compiler, PyTorch's kernels: Q4_0/Q4_1 as packed int4 (exact), other types as per-row int8.
With float32 everything is dequantized (the reference mode). Dense bf16 weights run through torch, except for a few
rows (decode steps) on CPUs with AVX-512 BF16, where a C kernel (hearth/kernels/bf16_cpu.c) reads them faster.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from hearth.kernels import bf16_cpu, gguf_cpu
from hearth.kernels.int4_mm import can_dequantize, int4_mm, int4_mm_dense, pack_int4
from hearth.kernels.int8_mm import int8_mm, quantize_per_row
from hearth.layers.context import get_context
from hearth.quant.gguf_types import QuantizedTensor, split_q4_blocks

INT4_TYPES = ("Q4_0", "Q4_1")


def quantized_rows(qt: QuantizedTensor):
    """rows(a, b) of a 2-D GGUF tensor, dequantized to float32 only for that range."""
    return lambda a, b: QuantizedTensor(qt.data[a:b], qt.qtype, (b - a, qt.shape[1])).dequantize()


# from this many rows (tokens) on, a packed-int4 layer dequantizes its weight to bf16 and runs a dense matmul: at
# prefill sizes that beats the int4 kernel
DENSE_MIN_TOKENS = 64
# GGUF blocks in bf16 runs, in steps that prefill, dequantize to bf16 and run the dense matmul; fewer rows than this
# are padded to it. oneDNN's bf16 result for a row then does not depend on how many rows share the matmul, so a
# prompt's last few tokens after a prefix-cache hit compute exactly what the whole prompt did. Decode-only steps (every
# model, fused or not) and a tied LM head (Embedding.as_lm_head) use the int8-activation kernel on the packed weight,
# as llama.cpp does: a decode step is bound by the bytes it reads, about one per weight there against five for
# dequantize + matmul.
BLOCKS_DENSE_MIN_TOKENS = 16


def gguf_blocks(qt: QuantizedTensor) -> gguf_cpu.R16Weight:
    """A GGUF weight in the C kernels' form: its own blocks repacked if they read its type, else requantized to Q8_0."""
    rows, cols = qt.shape
    if gguf_cpu.supports(qt.qtype, cols):
        return gguf_cpu.repack(qt.data, qt.qtype, rows, cols)
    return gguf_cpu.repack(gguf_cpu.quantize_q8_0(quantized_rows(qt), rows, cols), gguf_cpu.Q8_0, rows, cols)


def row_bucket(m: int) -> int:
    """`m` rows rounded up to one of a few sizes. oneDNN compiles and caches kernels for every new matmul shape and
    never gives that memory back, so without buckets a server's memory would grow with every distinct prompt length.
    With buckets a 512-token step budget yields at most 20 row counts of 16 or more per weight shape;
    fewer rows (decode batches: at most 15 shapes) are left as they are."""
    if m < 16:
        return m
    step = 16 if m <= 128 else 32 if m <= 512 else 64 if m <= 2048 else 256
    return -(-m // step) * step


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on 2-D x with its rows padded to `row_bucket` on CPU (each row's result is its own)."""
    m = x.shape[0]
    padded = row_bucket(m) if x.device.type == "cpu" and x.dim() == 2 else m
    if padded == m:
        return F.linear(x, w, bias)
    return F.linear(F.pad(x, (0, 0, 0, padded - m)), w, bias)[:m]


def is_decode_step() -> bool:
    """The model runner's step has decode rows only (one new token per sequence, or a few when it verifies draft
    tokens; nothing prefilling)."""
    ctx = get_context()
    return bool(ctx.decode_seq_idx or ctx.num_spec_seqs) and len(ctx.prefill_seq_idx) == ctx.num_spec_seqs


def blocks_mm(x: torch.Tensor, w: gguf_cpu.R16Weight, int8_activations: bool = False) -> torch.Tensor:
    """x [M, K] times a repacked GGUF weight [N, K] -> [M, N] in x's dtype. int8_activations (or a decode-only step,
    whatever the model): llama.cpp's arithmetic, x quantized per 32 values and the weight read in its packed form, as
    the Llama family's fused decode step does; each row's result is its own. Otherwise bf16 arithmetic on the weight
    dequantized to bf16 (prefill: compute-bound, where the dense matmul is faster)."""
    if int8_activations or is_decode_step():
        return gguf_cpu.gemm(x, w).to(x.dtype)
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    if m < BLOCKS_DENSE_MIN_TOKENS:
        xb = F.pad(xb, (0, 0, 0, BLOCKS_DENSE_MIN_TOKENS - m))
    return dequant_linear(xb, w)[:m].to(x.dtype)


# A weight dequantized for one matmul goes into a buffer kept per thread, of at most this many bytes; larger weights go
# in tiles of rows. A fresh tensor per call would, for weights past malloc's mmap threshold, fault in new pages on every
# call.
DEQUANT_SCRATCH_BYTES = 64 << 20
_scratch = threading.local()


def dequant_linear(x: torch.Tensor, w: gguf_cpu.R16Weight) -> torch.Tensor:
    """bf16 x [M >= 16, K] times W dequantized to bf16 (in tiles of rows when W is large) -> [M, N] bf16."""
    tile = min(w.n, max(16, DEQUANT_SCRATCH_BYTES // (2 * w.k) // 16 * 16))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < tile * w.k:
        buf = _scratch.buf = torch.empty(tile * w.k, dtype=torch.bfloat16)
    if tile == w.n:
        return cpu_linear(x, gguf_cpu.dequant(w, out=buf))
    out = torch.empty(x.shape[0], w.n, dtype=torch.bfloat16)
    for a in range(0, w.n, tile):
        b = min(a + tile, w.n)
        out[:, a:b] = cpu_linear(x, gguf_cpu.dequant(w, rows=(a, b), out=buf))
    return out


def _join(parts: list):
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        rows = sum(p.shape[0] for p in parts)
        return QuantizedTensor(torch.cat([p.data for p in parts]), first.qtype, (rows, first.shape[1]))
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


class Linear(nn.Module):
    """y = x W^T + b. `output_sizes` lists the row counts of fused shards (e.g. q, k, v); a plain layer has one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, output_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_sizes = output_sizes or [out_features]
        assert sum(self.output_sizes) == out_features
        self.has_bias = bias
        self._shards: dict[tuple[str, int], torch.Tensor | QuantizedTensor] = {}
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None
        self.int8_weight: torch.Tensor | None = None
        self.int8_scales: torch.Tensor | None = None
        self.quant_type: str | None = None
        self.blocks: gguf_cpu.R16Weight | None = None  # the weight in the C kernels' form
        self.int8_activations = False  # blocks with int8 activations at every M (EngineConfig.int8_prefill)
        self.can_dense = False  # the packed int4 weight can be dequantized for large-M matmuls

    def weight_loader(self, tensor: torch.Tensor | QuantizedTensor, kind: str = "weight", shard_id: int = 0) -> None:
        size = self.output_sizes[shard_id]
        rows = tensor.shape[0]
        if rows != size or (kind == "weight" and tensor.shape[1] != self.in_features):
            want = (size, self.in_features) if kind == "weight" else (size,)
            raise ValueError(f"{kind} shard {shard_id}: expected shape {want}, got {tuple(tensor.shape)}")
        self._shards[(kind, shard_id)] = tensor

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        n = len(self.output_sizes)
        missing = [i for i in range(n) if ("weight", i) not in self._shards]
        if missing:
            raise ValueError(f"missing weight shards {missing}")
        weight = _join([self._shards[("weight", i)] for i in range(n)])
        if self.has_bias:
            parts = [self._shards.get(("bias", i)) for i in range(n)]
            if any(p is None for p in parts):
                raise ValueError("missing bias")
            self.bias = torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts]).to(dtype)
        self._shards.clear()
        if isinstance(weight, QuantizedTensor):
            self.quant_type = weight.type_name
            if keep_quantized and dtype == torch.bfloat16:
                if gguf_cpu.available() and self.in_features % 32 == 0:
                    self.blocks = gguf_blocks(weight)
                elif weight.type_name in INT4_TYPES:
                    nibbles, scales, mins = split_q4_blocks(weight)
                    # w = d*nib + min = (nib - 8)*d + (min + 8d)
                    self.packed, self.scales_and_zeros = pack_int4(nibbles, scales, mins + 8 * scales)
                    self.can_dense = can_dequantize(self.out_features, self.in_features)
                else:
                    q, scales = quantize_per_row(quantized_rows(weight), weight.shape[0])
                    self.int8_weight, self.int8_scales = q, scales.to(torch.bfloat16)
                return
            weight = weight.dequantize()
        self.weight = weight.to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            out = blocks_mm(x.reshape(-1, self.in_features), self.blocks, self.int8_activations)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        if self.packed is not None:
            x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            if self.can_dense and x2d.shape[0] >= DENSE_MIN_TOKENS:
                out = int4_mm_dense(x2d, self.packed, self.scales_and_zeros, 32)
            else:
                out = int4_mm(x2d, self.packed, self.scales_and_zeros, 32)
            if x.dim() != 2:
                out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        if self.int8_weight is not None:
            out = int8_mm(x.reshape(-1, self.in_features), self.int8_weight, self.int8_scales)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        # a decode step's few bf16 rows: the AVX-512 BF16 kernel reads W faster. Not in a step that prefills: a prompt's
        # last tokens after a prefix-cache hit must compute what the whole prompt's matmul did (oneDNN, row by row).
        # Draft verifications are decode rows here: they must compute what decoding those tokens would
        ctx = get_context()
        if bf16_cpu.can_run(x, self.weight) and len(ctx.prefill_seq_idx) == ctx.num_spec_seqs:
            out = bf16_cpu.gemv(x.reshape(-1, self.in_features), self.weight, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        return cpu_linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token embeddings. A GGUF-quantized table stays quantized: lookups dequantize only the rows they gather (exact).
    When the table doubles as the LM head (tied embeddings), the logits come from a copy in the C kernels' form
    (requantized to Q8_0 for types they do not read), or without them from a per-row int8 copy."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight: torch.Tensor | None = None
        self.qweight: QuantizedTensor | None = None
        self.int8_weight: torch.Tensor | None = None
        self.int8_scales: torch.Tensor | None = None
        self.lm_blocks: gguf_cpu.R16Weight | None = None  # the LM head in the C kernels' form
        self.quant_type: str | None = None
        self.dtype = torch.float32

    def weight_loader(self, tensor: torch.Tensor | QuantizedTensor, kind: str = "weight", shard_id: int = 0) -> None:
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding: expected {(self.num_embeddings, self.embedding_dim)}, got {tuple(tensor.shape)}")
        self.weight = tensor  # placed in finalize()

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        if self.weight is None:
            raise ValueError("missing weight")
        self.dtype = dtype
        weight, self.weight = self.weight, None
        if isinstance(weight, QuantizedTensor):
            self.quant_type = weight.type_name
            if keep_quantized and dtype == torch.bfloat16:
                self.qweight = QuantizedTensor(weight.data.contiguous(), weight.qtype, tuple(weight.shape))
                return
            weight = weight.dequantize()
        self.weight = weight.to(dtype).contiguous()

    def tie_lm_head(self) -> None:
        """Prepare the logits form of a quantized table (called by models with tied embeddings)."""
        if self.qweight is not None and self.lm_blocks is None and gguf_cpu.available() and self.embedding_dim % 32 == 0:
            self.lm_blocks = gguf_blocks(self.qweight)
        if self.qweight is not None and self.lm_blocks is None and self.int8_weight is None:
            q, scales = quantize_per_row(quantized_rows(self.qweight), self.qweight.shape[0])
            self.int8_weight, self.int8_scales = q, scales.to(torch.bfloat16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            rows = self.qweight.data[input_ids]
            return QuantizedTensor(rows, self.qweight.qtype, (len(input_ids), self.embedding_dim)).dequantize().to(self.dtype)
        return F.embedding(input_ids, self.weight)

    def as_lm_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits from the (tied) embedding table."""
        if self.qweight is not None:
            self.tie_lm_head()
            if self.lm_blocks is not None:
                # always the int8-activation kernel: a dense copy of a whole vocabulary would cost more than it saves
                return gguf_cpu.gemm(hidden_states, self.lm_blocks).to(hidden_states.dtype)
            return int8_mm(hidden_states, self.int8_weight, self.int8_scales)
        return hidden_states @ self.weight.t()
