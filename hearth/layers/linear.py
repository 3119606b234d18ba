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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from torch import nn

from hearth.kernels import bf16_cpu, gguf_cpu
from hearth.kernels.int4_mm import can_dequantize, int4_mm, int4_mm_dense, pack_int4
from hearth.kernels.int8_mm import int8_mm, quantize_per_row
from hearth.layers.context import get_context
from hearth.layers.distributed import all_reduce, gather_last_dim, get_tensor_parallel, head_partition, split_range
from hearth.quant.gguf_types import QuantizedTensor, row_nbytes, split_q4_blocks

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
# ...where bf16 matmuls are fast: with AVX512-BF16 or AMX. Without them (an AVX2 CPU) oneDNN runs bf16 at about a fifth
# of its float32 speed (7 against 31 GFLOP/s on 2 cores of an AVX2-only EPYC), slower than the int8-activation
# kernel, which then takes every step.
BF16_MATMUL_FAST = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
                        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # fmt: skip


def gguf_blocks(qt: QuantizedTensor | list[QuantizedTensor]) -> gguf_cpu.R16Weight:
    """A GGUF weight in the C kernels' form: Q8_0 read where it lies (in the file's map: nothing copied at load, and a
    decode step reads the file's bytes, 1/17 fewer than the repacked form), Q4_0 / Q4_1 repacked (their packing costs
    more per byte read, and decode is faster repacked), other types requantized to Q8_0 and repacked. A list is a
    fused weight's shards (one type), stacked by row: read or repacked where they lie, without joining them."""
    parts = qt if isinstance(qt, list) else [qt]
    rows, cols = sum(p.shape[0] for p in parts), parts[0].shape[1]
    qtype = parts[0].qtype
    if qtype == gguf_cpu.Q8_0 and gguf_cpu.can_read_in_place([p.data for p in parts], cols):
        return gguf_cpu.in_place([p.data for p in parts], qtype, rows, cols)
    if gguf_cpu.supports(qtype, cols):
        return gguf_cpu.repack([p.data for p in parts], qtype, rows, cols)
    qt = _join(parts)
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


def heads_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [H, M, K] @ weight [H, N, K]^T per head -> [H, M, N] in x's dtype (MLA's absorbed decode). A few bf16 rows go
    through the AVX-512 BF16 kernel, which reads the heads' matrices at the memory's speed; torch's bmm does not."""
    weight = weight.to(x.dtype)
    if x.device.type == "cpu" and bf16_cpu.can_run(x[0], weight[0]):
        return bf16_cpu.gemv_heads(x, weight)
    return torch.bmm(x, weight.transpose(1, 2))


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for dense matmuls on x: float32 in place of bf16 on a CPU where bf16 matmuls are slow
    (BF16_MATMUL_FAST), else x's own."""
    return torch.float32 if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not BF16_MATMUL_FAST else x.dtype


def is_decode_step() -> bool:
    """The model runner's step has decode rows only (one new token per sequence, or a few when it verifies draft
    tokens; nothing prefilling)."""
    ctx = get_context()
    return bool(ctx.decode_seq_idx or ctx.num_spec_seqs) and len(ctx.prefill_seq_idx) == ctx.num_spec_seqs


def blocks_mm(x: torch.Tensor, w: gguf_cpu.R16Weight, int8_activations: bool = False) -> torch.Tensor:
    """x [M, K] times a repacked GGUF weight [N, K] -> [M, N] in x's dtype. int8_activations (or a decode-only step,
    whatever the model): llama.cpp's arithmetic, x quantized per 32 values and the weight read in its packed form, as
    the Llama family's fused decode step does; each row's result is its own; and every step on a CPU without fast bf16
    matmuls. Otherwise bf16 arithmetic on the weight dequantized to bf16 (prefill: compute-bound, where the dense
    matmul is faster)."""
    if int8_activations or is_decode_step() or not BF16_MATMUL_FAST:
        if x.dtype in (torch.bfloat16, torch.float32):
            return gguf_cpu.gemm(x, w, dtype=x.dtype)
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


def dequant_linear(x: torch.Tensor, w: gguf_cpu.R16Weight, wide: bool = False) -> torch.Tensor:
    """bf16 x [M >= 16, K] times W dequantized to bf16 (in tiles of rows when W is large) -> [M, N] bf16, or with
    `wide` float32: the same products, summed in float32 and not rounded to bf16 (a row-parallel partial sum)."""
    tile = min(w.n, max(16, DEQUANT_SCRATCH_BYTES // (2 * w.k) // 16 * 16))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < tile * w.k:
        buf = _scratch.buf = torch.empty(tile * w.k, dtype=torch.bfloat16)

    def mm(weight: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x.float(), weight.float()) if wide else cpu_linear(x, weight)

    if tile == w.n:
        return mm(gguf_cpu.dequant(w, out=buf))
    out = torch.empty(x.shape[0], w.n, dtype=torch.float32 if wide else torch.bfloat16)
    for a in range(0, w.n, tile):
        b = min(a + tile, w.n)
        out[:, a:b] = mm(gguf_cpu.dequant(w, rows=(a, b), out=buf))
    return out


def _join(parts: list):
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        rows = sum(p.shape[0] for p in parts)
        return QuantizedTensor(torch.cat([p.data for p in parts]), first.qtype, (rows, first.shape[1]))
    if len(parts) == 1 and isinstance(parts[0], torch.Tensor):  # one dense shard: kept as loaded (a view of the file)
        return parts[0]
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


class LinearMethod:
    """How one Linear holds its weight and multiplies by it, chosen once at load by `select_method` (one subclass per
    weight format); the Linear classes (plain, column- and row-parallel) combine with any of them."""

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_wide(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in float32, without the final rounding to x's dtype where the method can (a row-parallel layer's
        partial sum, so that the sum over ranks rounds once, as one whole matmul does)."""
        return self.apply(x, None).float()


@dataclass(eq=False)
class DenseMethod(LinearMethod):
    """A dense weight in the compute dtype."""

    weight: torch.Tensor

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # a decode step's few bf16 rows: the AVX-512 BF16 kernel reads W faster. Not in a step that prefills: a prompt's
        # last tokens after a prefix-cache hit must compute what the whole prompt's matmul did (oneDNN, row by row).
        # Draft verifications are decode rows here: they must compute what decoding those tokens would
        ctx = get_context()
        if bf16_cpu.can_run(x, self.weight) and len(ctx.prefill_seq_idx) == ctx.num_spec_seqs:
            out = bf16_cpu.gemv(x.reshape(-1, self.weight.shape[1]), self.weight, bias)
            return out.reshape(*x.shape[:-1], self.weight.shape[0])
        if matmul_dtype(x) != x.dtype and x.dim() == 2:
            # on a CPU whose bf16 matmuls are slow (7 GFLOP/s against 31 in float32 on an AVX2 EPYC): the weight
            # widened for this call (exact), one rounding of the output to bf16 as the bf16 matmul gives it. Rows
            # padded to BLOCKS_DENSE_MIN_TOKENS, as blocks_mm does: BLAS takes another kernel (another summation order)
            # for fewer, and a prompt's last rows after a prefix-cache hit must compute what the whole prompt did
            m = x.shape[0]
            wide = None if bias is None else bias.float()
            xf = F.pad(x.float(), (0, 0, 0, max(0, BLOCKS_DENSE_MIN_TOKENS - m)))
            return cpu_linear(xf, self.weight.float(), wide)[:m].to(x.dtype)
        return cpu_linear(x, self.weight, bias)


@dataclass(eq=False)
class BlocksMethod(LinearMethod):
    """GGUF blocks in the C kernels' row-interleaved form (`blocks_mm`)."""

    blocks: gguf_cpu.R16Weight
    int8_activations: bool = False  # int8 activations at every M (EngineConfig.int8_prefill)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = blocks_mm(x.reshape(-1, self.blocks.k), self.blocks, self.int8_activations)
        out = out.reshape(*x.shape[:-1], self.blocks.n)
        return out if bias is None else out + bias

    def apply_wide(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.blocks.k)
        if self.int8_activations or is_decode_step() or not BF16_MATMUL_FAST:
            out = gguf_cpu.gemm(x2d, self.blocks).float()
        else:
            m = x2d.shape[0]
            xb = F.pad(x2d.to(torch.bfloat16), (0, 0, 0, max(0, BLOCKS_DENSE_MIN_TOKENS - m)))
            out = dequant_linear(xb, self.blocks, wide=True)[:m]
        return out.reshape(*x.shape[:-1], self.blocks.n)


@dataclass(eq=False)
class Int4Method(LinearMethod):
    """Q4_0/Q4_1 as PyTorch's packed int4 (exact), without the C kernels."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    out_features: int
    in_features: int
    can_dense: bool = False  # the packed weight can be dequantized for large-M matmuls

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.can_dense and x2d.shape[0] >= DENSE_MIN_TOKENS:
            out = int4_mm_dense(x2d, self.packed, self.scales_and_zeros, 32)
        else:
            out = int4_mm(x2d, self.packed, self.scales_and_zeros, 32)
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias


@dataclass(eq=False)
class Int8Method(LinearMethod):
    """Other GGUF types as per-row int8, without the C kernels."""

    int8_weight: torch.Tensor
    int8_scales: torch.Tensor

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = int8_mm(x.reshape(-1, self.int8_weight.shape[1]), self.int8_weight, self.int8_scales)
        out = out.reshape(*x.shape[:-1], self.int8_weight.shape[0])
        return out if bias is None else out + bias


def select_method(parts: list[torch.Tensor | QuantizedTensor], dtype: torch.dtype, keep_quantized: bool) -> LinearMethod:
    """The method for a loaded [out, in] weight, given as its fused shards (stacked by row): GGUF blocks stay
    quantized in bf16 runs (C kernels' form, else packed int4 or per-row int8), anything else is held dense in
    `dtype`. Shards of one GGUF type go to the C kernels' form without being joined first (no copy of the weight)."""
    one_type = all(isinstance(p, QuantizedTensor) for p in parts) and len({p.qtype for p in parts}) == 1
    if one_type and keep_quantized and dtype == torch.bfloat16 and gguf_cpu.available() and parts[0].shape[1] % 32 == 0:
        return BlocksMethod(gguf_blocks(parts))
    weight = _join(parts)
    if isinstance(weight, QuantizedTensor):
        out_features, in_features = weight.shape
        if keep_quantized and dtype == torch.bfloat16:
            if weight.type_name in INT4_TYPES:
                nibbles, scales, mins = split_q4_blocks(weight)
                # w = d*nib + min = (nib - 8)*d + (min + 8d)
                packed, scales_and_zeros = pack_int4(nibbles, scales, mins + 8 * scales)
                return Int4Method(packed, scales_and_zeros, out_features, in_features,
                                  can_dequantize(out_features, in_features))  # fmt: skip
            q, scales = quantize_per_row(quantized_rows(weight), weight.shape[0])
            return Int8Method(q, scales.to(torch.bfloat16))
        weight = weight.dequantize()
    return DenseMethod(weight.to(dtype).contiguous())


class Linear(nn.Module):
    """y = x W^T + b. `output_sizes` lists the row counts of fused shards (e.g. q, k, v); a plain layer has one.
    The weight's format decides the `method` (set in `finalize`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, output_sizes: list[int] | None = None):
        super().__init__()
        sizes = output_sizes or [out_features]
        assert sum(sizes) == out_features
        # Plain attributes (no Parameter, buffer or Module among them) set in one step: nn.Module.__setattr__'s checks,
        # once per attribute, were a visible share of building a model of thousands of expert linears.
        # _shards: the loaded (kind, shard) tensors until `finalize`; method: the LinearMethod it chooses; keep_dense:
        # a router, which `requantize_dense` leaves as it is.
        vars(self).update(in_features=in_features, out_features=out_features, output_sizes=sizes, has_bias=bias,
                          _shards={}, bias=None, quant_type=None, method=None, keep_dense=False)  # fmt: skip

    # the held weight by format, None where another method holds it (the fused decode and benchmarks read these)
    def _held(self, cls: type, field: str):
        return getattr(self.method, field) if isinstance(self.method, cls) else None

    weight = property(lambda self: self._held(DenseMethod, "weight"))
    blocks = property(lambda self: self._held(BlocksMethod, "blocks"))
    packed = property(lambda self: self._held(Int4Method, "packed"))
    scales_and_zeros = property(lambda self: self._held(Int4Method, "scales_and_zeros"))
    can_dense = property(lambda self: bool(self._held(Int4Method, "can_dense")))
    int8_weight = property(lambda self: self._held(Int8Method, "int8_weight"))
    int8_scales = property(lambda self: self._held(Int8Method, "int8_scales"))

    @property
    def int8_activations(self) -> bool:
        return bool(self._held(BlocksMethod, "int8_activations"))

    @int8_activations.setter
    def int8_activations(self, value: bool) -> None:
        if isinstance(self.method, BlocksMethod):
            self.method.int8_activations = value

    def requantize_q8_0(self) -> bool:
        """A dense bf16 weight as Q8_0 blocks in the C kernels' form (read with int8 activations in decode steps, as a
        GGUF Q8_0 weight is); False where there is no dense bf16 weight or no C kernels."""
        method = self.method
        if not (isinstance(method, DenseMethod) and method.weight.dtype == torch.bfloat16 and gguf_cpu.available()):
            return False
        n, k = method.weight.shape
        if not gguf_cpu.supports(gguf_cpu.Q8_0, k):
            return False
        w = method.weight
        blocks = gguf_cpu.quantize_q8_0(lambda a, b: w[a:b].float(), n, k)
        self.method = BlocksMethod(gguf_cpu.repack(blocks, gguf_cpu.Q8_0, n, k))
        self.quant_type = "Q8_0"
        return True

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
        weights = [self._shards[("weight", i)] for i in range(n)]
        if self.has_bias:
            parts = [self._shards.get(("bias", i)) for i in range(n)]
            if any(p is None for p in parts):
                raise ValueError("missing bias")
            self.bias = torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts]).to(dtype)
        self._shards.clear()
        if all(isinstance(w, QuantizedTensor) for w in weights) and len({w.qtype for w in weights}) == 1:
            self.quant_type = weights[0].type_name
        self.method = select_method(weights, dtype, keep_quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x, self.bias)


def _rows(t, a: int, b: int):
    """Rows a:b of a weight, bias or GGUF QuantizedTensor, copied: a rank keeps only its shard in memory."""
    if isinstance(t, QuantizedTensor):
        return QuantizedTensor(t.data[a:b].clone(), t.qtype, (b - a, *t.shape[1:]))
    return t[a:b].clone()


def _columns(t, a: int, b: int):
    """Input columns a:b of a [out, in] weight. GGUF blocks run along the input: the cut must fall on block edges."""
    if isinstance(t, QuantizedTensor):
        block = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)][0]
        if a % block or b % block:
            raise ValueError(f"a tensor-parallel shard of the input columns ({a}:{b}) does not fall on the {block}-value "
                             f"blocks of this {t.type_name} weight; use another tensor-parallel size")  # fmt: skip
        lo, hi = row_nbytes(t.qtype, a), row_nbytes(t.qtype, b)
        return QuantizedTensor(t.data[:, lo:hi].clone(), t.qtype, (t.shape[0], b - a))
    return t[:, a:b].clone()


def requantize_dense(model: nn.Module) -> int:
    """--int8-weights: every dense bf16 Linear of `model` but those marked `keep_dense` (routers) requantized to Q8_0
    blocks (`Linear.requantize_q8_0`); returns how many were."""
    return sum(m.requantize_q8_0() for m in model.modules() if isinstance(m, Linear) and not m.keep_dense)


class ColumnParallelLinear(Linear):
    """A Linear whose output rows are split over the tensor-parallel ranks: each fused shard (`output_sizes`, the
    checkpoint's sizes) keeps the rows `shard_ranges[i]` (default: an even split), and the output stays split."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 shard_ranges: list[tuple[int, int]] | None = None):  # fmt: skip
        tp = get_tensor_parallel()
        ranges = shard_ranges or [split_range(size, tp.rank, tp.size) for size in output_sizes]
        local = [b - a for a, b in ranges]
        super().__init__(in_features, sum(local), bias, local)
        self.tp_size = tp.size
        self.full_sizes = list(output_sizes)
        self.shard_ranges = ranges

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if self.tp_size > 1 and kind in ("weight", "bias"):
            if tensor.shape[0] != self.full_sizes[shard_id]:
                raise ValueError(f"{kind} shard {shard_id}: expected {self.full_sizes[shard_id]} rows, got {tensor.shape[0]}")
            tensor = _rows(tensor, *self.shard_ranges[shard_id])
        super().weight_loader(tensor, kind, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by attention heads (`head_partition`): each rank holds its query heads and the
    KV heads they read."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_tensor_parallel()
        q0, nq, k0, nkv = head_partition(num_heads, num_kv_heads, tp.rank, tp.size)
        kv = (k0 * head_dim, (k0 + nkv) * head_dim)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias,
                         [(q0 * head_dim, (q0 + nq) * head_dim), kv, kv])  # fmt: skip
        self.num_heads, self.num_kv_heads = nq, nkv  # this rank's
        self.q_range = (q0 * head_dim, (q0 + nq) * head_dim)  # this rank's columns of the attention output


class RowParallelLinear(Linear):
    """A Linear whose input columns are split over the ranks (`input_range` of the checkpoint's `in_features`,
    default an even split): each rank multiplies its part of the input, one all-reduce sums the parts, and the bias
    is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_range: tuple[int, int] | None = None):
        tp = get_tensor_parallel()
        self_range = input_range or split_range(in_features, tp.rank, tp.size)
        super().__init__(self_range[1] - self_range[0], out_features, bias)
        self.tp_size = tp.size
        self.full_in_features = in_features
        self.input_range = self_range

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if self.tp_size > 1 and kind == "weight":
            if len(tensor.shape) != 2 or tensor.shape[1] != self.full_in_features:
                raise ValueError(f"weight: expected {self.full_in_features} input columns, got {tuple(tensor.shape)}")
            tensor = _columns(tensor, *self.input_range)
        super().weight_loader(tensor, kind, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        out = all_reduce(self.method.apply_wide(x)).to(x.dtype)
        return out if self.bias is None else out + self.bias


class ParallelLMHead(ColumnParallelLinear):
    """The LM head split by vocabulary rows; rank 0 gets the whole logits (other ranks None)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, [vocab_size])
        tp = get_tensor_parallel()
        self.part_sizes = [b - a for a, b in (split_range(vocab_size, r, tp.size) for r in range(tp.size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.tp_size == 1:  # the layer's own size: a process may also hold a model built without parallelism
            return super().forward(x)
        return gather_last_dim(super().forward(x), self.part_sizes)


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
                # always the int8-activation kernel: a dense copy of a whole vocabulary would cost more than it saves;
                # float32 logits, as the fused decode step's (and llama.cpp's): bf16 logits of 16 and more are 0.125
                # apart, where a near tie becomes an exact one that argmax breaks by token id
                return gguf_cpu.gemm(hidden_states.to(self.dtype), self.lm_blocks, dtype=torch.float32)
            return int8_mm(hidden_states, self.int8_weight, self.int8_scales)
        return hidden_states @ self.weight.t()


class VocabParallelEmbedding(Embedding):
    """Token embeddings split by vocabulary rows over the tensor-parallel ranks: a rank looks up the ids in its range
    (zeros elsewhere) and one all-reduce joins them; as a tied LM head, rank 0 gathers the ranks' logits."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        tp = get_tensor_parallel()
        start, end = split_range(num_embeddings, tp.rank, tp.size)
        super().__init__(end - start, embedding_dim)
        self.vocab_start, self.vocab_end = start, end
        self.tp_size = tp.size
        self.full_vocab = num_embeddings
        self.part_sizes = [b - a for a, b in (split_range(num_embeddings, r, tp.size) for r in range(tp.size))]

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if self.tp_size > 1:
            if tuple(tensor.shape) != (self.full_vocab, self.embedding_dim):
                raise ValueError(f"embedding: expected {(self.full_vocab, self.embedding_dim)}, got {tuple(tensor.shape)}")
            tensor = _rows(tensor, self.vocab_start, self.vocab_end)
        super().weight_loader(tensor, kind, shard_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        out = super().forward((input_ids - self.vocab_start).masked_fill(outside, 0))
        return all_reduce(out.masked_fill(outside[:, None], 0))

    def as_lm_head(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.tp_size == 1:
            return super().as_lm_head(hidden_states)
        return gather_last_dim(super().as_lm_head(hidden_states), self.part_sizes)
