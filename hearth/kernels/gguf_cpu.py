"""CPU kernels on GGUF-quantized weights (gguf_cpu.c): matmuls and dequantization for Q4_0 / Q4_1 / Q8_0.

Weights are repacked once at load from the file's blocks (in C, fused shards read where they lie; `repack_ref` is
the same in torch) into a row-interleaved form (`R16Weight`, layout in r16_gemm.h) that lets one VNNI instruction
work on 16 rows; it holds the same bits (Q4_1: the same bytes; Q4_0 and Q8_0 +1/9 and +1/17 for the extra f16
offset row). Or they are read where they lie (`in_place`: the kernels build that form a row group at a time as they
read it, with the same results bit for bit; the model code does so for Q8_0). As in llama.cpp, activations are
quantized per 32 values to int8 for integer dot products; `gemm_ref` is that computation in plain torch on the
original blocks (quantize x the same way, dequantize W, float64 matmul), and `quantize_q8_ref` the activation step.
Other GGUF types are requantized once to Q8_0 (`quantize_q8_0`). `available()` is False without a C compiler; callers
then use PyTorch's int4 / int8 kernels.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from hearth.kernels.cbuild import Library
from hearth.quant.gguf_types import dequantize

SOURCE = os.path.join(os.path.dirname(__file__), "gguf_cpu.c")
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # GGML type ids
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


RAW_PARTS = 3  # shards of a fused weight read in place (r16_gemm.h)


class R16(ctypes.Structure):
    _fields_ = [("qs", ptr), ("sc", ptr), ("qtype", i64), ("N", i64), ("K", i64), ("raw", ptr * RAW_PARTS),
                ("raw_end", i64 * RAW_PARTS)]  # fmt: skip


def _declare(lib: ctypes.CDLL) -> None:
    r16 = ctypes.POINTER(R16)
    lib.r16_gemm.argtypes = [i64, r16, ptr, c_int, ptr, c_int, c_int, c_int]
    lib.r16_dequant.argtypes = [r16, i64, i64, ptr, c_int, c_int, c_int]
    lib.gguf_quantize_q8.argtypes = [i64, i64, ptr, ptr, ptr, ptr]
    lib.r16_moe.argtypes = [i64, i64, i64, r16, r16, ptr, ptr, ptr, c_int, ptr, c_int, c_int]
    lib.r16_moe.restype = c_int
    lib.r16_repack.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, c_int]
    for name in ("r16_gemm", "r16_dequant", "gguf_quantize_q8", "r16_repack"):
        getattr(lib, name).restype = None


_get = Library(SOURCE, "GGUF matmuls", _declare)


def available() -> bool:
    return _get() is not None


def supports(qtype: int, k: int) -> bool:
    return qtype in BLOCK_BYTES and k % 32 == 0


@dataclass(slots=True)
class R16Weight:
    """A [n, k] weight in the kernels' row-interleaved form: qs uint8 [groups, k/32, chunk bytes], sc f16
    [groups, k/32, 2, 16] (per row: scale d, then offset m), from GGUF type `qtype` (w = d*q + m). Or, with `raw`
    (`in_place`), the file's own blocks as row-major parts stacked by row (qs and sc empty), which the kernels pack a
    row group at a time as they read it."""

    qs: torch.Tensor
    sc: torch.Tensor
    qtype: int
    n: int
    k: int
    raw: tuple[torch.Tensor, ...] = ()
    _struct: R16 | None = field(default=None, init=False, repr=False, compare=False)

    def struct(self) -> R16:
        """The C struct (built once: a decode step passes it for every projection)."""
        if self._struct is None:
            if not self.raw:
                self._struct = R16(self.qs.data_ptr(), self.sc.data_ptr(), self.qtype, self.n, self.k)
            else:
                ends = list(itertools.accumulate(p.shape[0] for p in self.raw))
                self._struct = R16(None, None, self.qtype, self.n, self.k,
                                   (ptr * RAW_PARTS)(*(p.data_ptr() for p in self.raw)), (i64 * RAW_PARTS)(*ends))  # fmt: skip
        return self._struct

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: the repacked form's, or the file's blocks."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.sc, *self.raw))


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux to back the whole 2 MiB pages of `t` (fresh, untouched memory) with transparent huge pages: writing a
    freshly allocated multi-GB weight then takes 512x fewer page faults, which on a VM cost as much as the writes."""
    if not sys.platform.startswith("linux"):
        return t
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last > first:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(MADV_HUGEPAGE))
        except (OSError, AttributeError):  # no libc madvise: ordinary pages
            pass
    return t


def _parts(blocks: torch.Tensor | list[torch.Tensor], qtype: int, n: int, k: int) -> list[torch.Tensor]:
    """`blocks` as a list of row-major [rows, k/32 * block bytes] uint8 parts, checked against the [n, k] shape."""
    parts = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    row_bytes = k // 32 * BLOCK_BYTES.get(qtype, 0)
    if not supports(qtype, k) or not parts or sum(p.numel() for p in parts) != n * row_bytes:
        raise ValueError(f"GGUF kernel: cannot repack type {qtype} blocks as a {n}x{k} weight")
    if any(p.dtype != torch.uint8 or p.numel() % row_bytes for p in parts):
        raise ValueError(f"GGUF kernel: parts of a {n}x{k} weight must be uint8 whole rows of {row_bytes} bytes")
    return [p.reshape(-1, row_bytes) for p in parts]


def repack(blocks: torch.Tensor | list[torch.Tensor], qtype: int, n: int, k: int) -> R16Weight:
    """GGUF blocks [n, k/32 * block bytes] (Q4_0, Q4_1 or Q8_0) -> R16Weight, once at load. `blocks` may be a list of
    parts stacked by row (e.g. a fused gate_up's gate and up shards, separate tensors in the file): they are read
    where they lie, without joining them first. In C (r16_repack, threads over row groups) when the library is
    built, else `repack_ref`; the two agree byte for byte."""
    parts = _parts(blocks, qtype, n, k)
    lib = _get()
    if lib is None:
        return repack_ref(parts, qtype, n, k)
    parts = [p.contiguous() for p in parts]
    nb, groups = k // 32, (n + 15) // 16
    qs = huge_pages(torch.empty(groups, nb, 16 * (32 if qtype == Q8_0 else 16), dtype=torch.uint8))
    sc = torch.empty(groups, nb, 2, 16, dtype=torch.float16)
    srcs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64)
    ends = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64).cumsum(0)
    lib.r16_repack(qtype, n, k, len(parts), srcs.data_ptr(), ends.data_ptr(), qs.data_ptr(), sc.data_ptr(),
                   torch.get_num_threads())  # fmt: skip
    return R16Weight(qs, sc, qtype, n, k)


def can_read_in_place(parts: list[torch.Tensor], k: int) -> bool:
    """`in_place` takes these shards: few enough, each contiguous, of whole rows."""
    return available() and k % 32 == 0 and 0 < len(parts) <= RAW_PARTS and all(p.is_contiguous() for p in parts)


def in_place(blocks: torch.Tensor | list[torch.Tensor], qtype: int, n: int, k: int) -> R16Weight:
    """GGUF blocks [n, k/32 * block bytes] (Q4_0, Q4_1 or Q8_0; a list: up to RAW_PARTS shards stacked by row) as an
    R16Weight that reads them where they lie (e.g. views of the mapped file): nothing is copied at load, and the
    kernels pack each row group as they read it, into the bytes `repack` would have written, so every result is the
    same bit for bit. A decode step then reads the file's bytes (Q4_0 and Q8_0: 1/9 and 1/17 fewer than the repacked
    form); packing costs a few instructions per block, which prefill's many rows per group pay once."""
    parts = _parts(blocks, qtype, n, k)
    if len(parts) > RAW_PARTS:
        raise ValueError(f"GGUF kernel: at most {RAW_PARTS} shards of a weight are read in place, got {len(parts)}")
    if any(not p.is_contiguous() for p in parts):
        raise ValueError("GGUF kernel: blocks read in place must be contiguous rows")
    empty = torch.empty(0, dtype=torch.uint8)
    return R16Weight(empty, empty.view(torch.float16), qtype, n, k, tuple(parts))


def repack_ref(blocks: torch.Tensor | list[torch.Tensor], qtype: int, n: int, k: int, chunk_rows: int = 4096) -> R16Weight:
    """`repack` in plain torch (the layout spelled out; the fallback without the C library), `chunk_rows` rows at a
    time so that the temporaries stay small next to a large table (SmolLM2's 49152-row embedding)."""
    parts = _parts(blocks, qtype, n, k)
    blk = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(n, k // 32, BLOCK_BYTES[qtype])
    nb, groups = k // 32, (n + 15) // 16
    qs = torch.empty(groups, nb, 16 * (32 if qtype == Q8_0 else 16), dtype=torch.uint8)  # 16 rows of block bytes
    sc = torch.empty(groups, nb, 2, 16, dtype=torch.float16)
    chunk_rows = max(16, chunk_rows // 16 * 16)
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        qs[a // 16 : (b + 15) // 16], sc[a // 16 : (b + 15) // 16] = _repack_rows(blk[a:b], qtype)
    return R16Weight(qs, sc, qtype, n, k)


def _repack_rows(blk: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, nb, block bytes] -> (qs [n/16 rounded up, nb, chunk bytes], sc [.., nb, 2, 16]); the last group is
    padded with zero rows."""
    n, nb = blk.shape[:2]
    groups = (n + 15) // 16
    d = blk[..., :2].contiguous().view(torch.float16)[..., 0]  # [n, nb]
    if qtype == Q8_0:
        v = blk[..., 2:] ^ 0x80  # int8 q + 128 as uint8 (flipping the sign bit)
        qs = v.reshape(n, nb, 8, 4)  # chunk c, byte j = value 4c + j
        m = d * -128  # exact: a power-of-two multiple
    else:
        o = 4 if qtype == Q4_1 else 2
        q = blk[..., o : o + 16]
        v = torch.cat([q & 15, q >> 4], dim=-1).reshape(n, nb, 4, 2, 4)  # values 0..31 as [c][lo/hi][j]
        qs = v[..., 0, :] | (v[..., 1, :] << 4)  # chunk c, byte j = values 8c + j (low) and 8c + 4 + j (high)
        m = blk[..., 2:4].contiguous().view(torch.float16)[..., 0] if qtype == Q4_1 else d * -8
    pad = groups * 16 - n
    qs = torch.nn.functional.pad(qs, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(groups, 16, nb, -1, 4)
    qs = qs.permute(0, 2, 3, 1, 4).reshape(groups, nb, -1)  # [groups, nb, chunks * 16 rows * 4]
    sc = torch.stack([d, m], dim=-1)  # [n, nb, 2]
    sc = torch.nn.functional.pad(sc, (0, 0, 0, 0, 0, pad)).reshape(groups, 16, nb, 2).permute(0, 2, 3, 1)
    return qs, sc


def gemm(x: torch.Tensor, w: R16Weight, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [M, K] -> x W^T [M, N] with int8 activations: float32 (added into `out` when given), or with `dtype` bf16
    the float32 result rounded once to bf16. bf16 x is read as it is (the values torch's .float() gives)."""
    lib = _get()
    m, k = x.shape
    assert k == w.k and dtype in (torch.float32, torch.bfloat16)
    x_bf16 = x.dtype == torch.bfloat16
    x = x.contiguous() if x_bf16 else x.float().contiguous()
    accumulate = out is not None
    assert not (accumulate and dtype == torch.bfloat16)
    if out is None:
        out = torch.empty(m, w.n, dtype=dtype)
    assert out.dtype == torch.float32 or not accumulate
    assert out.is_contiguous() and out.shape == (m, w.n)
    lib.r16_gemm(m, ctypes.byref(w.struct()), x.data_ptr(), int(x_bf16), out.data_ptr(), int(dtype == torch.bfloat16),
                 int(accumulate), torch.get_num_threads())  # fmt: skip
    return out


class R16Experts:
    """A MoE layer's experts for `moe`: expert e's gate and up rows stacked [2 F_e, H] (gate first) and its down
    projection [H, F_e], as R16 weights (any of the kernels' types, F_e may differ per expert: the shared experts can
    be listed as more experts). Holds the C structs' array; the weights' tensors must outlive it."""

    def __init__(self, gate_up: list[R16Weight], down: list[R16Weight]):
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError("R16Experts: one gate/up and one down weight per expert")
        hidden = gate_up[0].k
        for gu, dn in zip(gate_up, down):
            if gu.k != hidden or dn.n != hidden or gu.n != 2 * dn.k or dn.k % 32:
                raise ValueError(f"R16Experts: gate/up {gu.n}x{gu.k} and down {dn.n}x{dn.k} do not make a SwiGLU "
                                 f"expert of hidden size {hidden}")  # fmt: skip
        self.hidden, self.num_experts = hidden, len(gate_up)
        self.gate_up = (R16 * len(gate_up))(*(w.struct() for w in gate_up))
        self.down = (R16 * len(down))(*(w.struct() for w in down))
        self._weights = (gate_up, down)


def moe(x: torch.Tensor, experts: R16Experts, ids: torch.Tensor, weights: torch.Tensor,
        dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """x [T, H], ids [T, S] (int, expert indices) and weights [T, S] -> [T, H] float32 (or with `dtype` bf16, rounded
    once): out[t] = sum_s weights[t, s] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, s], all in one C call with
    int8 activations (x, then each SwiGLU output, quantized per 32 values as in `gemm`; bf16 x read as it is).
    `moe_ref` is the same in torch."""
    t, h = x.shape
    if h != experts.hidden or ids.shape != weights.shape or ids.shape[0] != t or not ids.numel():
        raise ValueError(f"moe: x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights {tuple(weights.shape)}")
    assert dtype in (torch.float32, torch.bfloat16)
    ids = ids.to(torch.int64).contiguous()
    x_bf16 = x.dtype == torch.bfloat16
    x = x.contiguous() if x_bf16 else x.float().contiguous()
    weights = weights.float().contiguous()
    out = torch.empty(t, h, dtype=dtype)
    if _get().r16_moe(t, ids.shape[1], experts.num_experts, experts.gate_up, experts.down, ids.data_ptr(),
                      weights.data_ptr(), x.data_ptr(), int(x_bf16), out.data_ptr(), int(dtype == torch.bfloat16),
                      torch.get_num_threads()):  # fmt: skip
        raise ValueError(f"moe: expert ids outside [0, {experts.num_experts})")
    return out


def moe_ref(x: torch.Tensor, gate_up: list[tuple[torch.Tensor, int, int]], down: list[tuple[torch.Tensor, int, int]],
            ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """What `moe` computes, in plain torch on the original GGUF blocks (each weight as (blocks, qtype, rows)):
    per (token, slot) `gemm_ref` for gate/up, SwiGLU in float32, `gemm_ref` for down, the weighted sum in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            h = gemm_ref(x[t : t + 1], *gate_up[e])
            g, u = h.chunk(2, dim=-1)
            y = gemm_ref(torch.nn.functional.silu(g) * u, *down[e])
            out[t] += float(weights[t, s]) * y[0]
    return out


class StorePicker:
    """Plain or non-temporal ("streamed") stores for dequantizing to bf16, whichever has lately cost less per value.

    The dequantization buffer is reused for every weight and read by both cores in the matmul that follows. When
    memory is not the bottleneck, plain stores cost what streamed ones do and leave the weight in cache for the
    matmul; when it is, streamed stores are much cheaper (figures in docs/performance.md). So:
    plain, unless plain has cost more than `margin` times streamed; every `probe_every`-th call tries the other kind,
    so the choice follows the machine. The values written are the same either way."""

    def __init__(self, probe_every: int = 32, margin: float = 1.3, decay: float = 0.8):
        self.probe_every, self.margin, self.decay = probe_every, margin, decay
        self.cost: list[float | None] = [None, None]  # seconds per value, moving averages: [plain, streamed]
        self.calls = 0

    def best(self) -> bool:
        plain, streamed = self.cost
        if plain is None or streamed is None:
            return plain is not None  # measure plain first, then streamed
        return plain > self.margin * streamed

    def pick(self) -> bool:
        self.calls += 1
        best = self.best()
        return not best if self.calls % self.probe_every == 0 else best

    def record(self, stream: bool, seconds: float, values: int) -> None:
        cost, old = seconds / max(values, 1), self.cost[stream]
        self.cost[stream] = cost if old is None else self.decay * old + (1 - self.decay) * cost


_stores = StorePicker()


def dequant(w: R16Weight, dtype: torch.dtype = torch.bfloat16, rows: tuple[int, int] | None = None,
            out: torch.Tensor | None = None, stream: bool | None = None) -> torch.Tensor:  # fmt: skip
    """W (or its rows [a, b), a a multiple of 16) -> [b - a, K] in bfloat16 or float32, each value as gguf-py
    dequantizes it, then rounded once; into `out` (contiguous, at least that many elements) when given. `stream`:
    non-temporal stores for bf16 (None: as StorePicker finds faster lately); the values are the same."""
    assert dtype in (torch.bfloat16, torch.float32)
    a, b = rows or (0, w.n)
    if a % 16 or (b % 16 and b != w.n) or not 0 <= a < b <= w.n:
        raise ValueError(f"dequant: rows [{a}, {b}) of a {w.n}-row weight (16-row groups, the last may be short)")
    if out is None:
        out = torch.empty(b - a, w.k, dtype=dtype)
    else:
        assert out.dtype == dtype and out.is_contiguous() and out.numel() >= (b - a) * w.k
        out = out.view(-1)[: (b - a) * w.k].view(b - a, w.k)
    bf16 = dtype == torch.bfloat16
    picked = stream is None and bf16
    if picked:
        stream = _stores.pick()
    start = time.perf_counter()
    _get().r16_dequant(ctypes.byref(w.struct()), a // 16, (b + 15) // 16, out.data_ptr(), int(bf16), int(bool(stream)),
                       torch.get_num_threads())  # fmt: skip
    if picked:
        _stores.record(stream, time.perf_counter() - start, out.numel())
    return out


def quantize_q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation step in torch: x [M, K] -> (int values [M, K/32, 32], scales [M, K/32, 1])."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(xb * inv), d


def gemm_ref(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """What `gemm` computes, in plain torch: int8-quantized x times the dequantized W, summed in float64."""
    k = x.shape[1]
    q, d = quantize_q8_ref(x)
    xr = (q.double() * d.double()).reshape(x.shape[0], k)
    w = dequantize(blocks.reshape(-1), qtype, (n, k)).double()
    return (xr @ w.t()).float()


def quantize_q8_0(rows, num_rows: int, k: int, chunk: int = 4096) -> torch.Tensor:
    """float rows -> Q8_0 blocks [num_rows, K/32*34] (d = amax/127 in f16, q = round(x/d)), as llama.cpp writes them.

    `rows(a, b)` returns rows a..b as float (e.g. dequantizing another GGUF type), so a large table is converted a
    chunk at a time."""
    out = torch.empty(num_rows, k // 32, 34, dtype=torch.uint8)
    for a in range(0, num_rows, chunk):
        b = min(a + chunk, num_rows)
        q, d = quantize_q8_ref(rows(a, b))  # the same per-32 step as the activations
        out[a:b, :, :2] = d.half().view(torch.uint8).reshape(b - a, k // 32, 2)
        out[a:b, :, 2:] = q.clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return out.reshape(num_rows, -1)
