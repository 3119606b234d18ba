"""CPU MXFP4 kernels (mxfp4_cpu.c), built by `cbuild.load_library` and called via ctypes.

Float32 activations use `gemv` (float FMAs on the HF-layout blocks). For bf16 serving, `repack` reorders experts'
blocks once at load (in C; `repack_ref` is the same in torch) into a 16-row interleaved form (`R16Mxfp4`, the same
bits; layout in the C source) and `moe_q8` runs them with int8 activations as llama.cpp does; `moe_q8_ref` is that
computation in plain torch (x quantized per 32 by `quantize_q8_ref`, W dequantized exactly, float64 matmul).
`available()` is False when no compiler is found or the build fails; callers then use the plain-torch path. Set
HEARTH_MXFP4_KERNEL=0 (or HEARTH_C_KERNELS=0) to disable.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass

import torch

from hearth.kernels.cbuild import Library
from hearth.kernels.gguf_cpu import huge_pages, quantize_q8_ref

SOURCE = os.path.join(os.path.dirname(__file__), "mxfp4_cpu.c")
MAX_M = 16  # rows of x per mxfp4_gemv call (MAX_M in the C source)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mxfp4_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_dequant.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_moe_q8.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    c_int, c_float = ctypes.c_int, ctypes.c_float
    lib.mxfp4_moe.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, c_int, ptr, ptr, ptr, ptr, ptr, ptr, c_int, c_float,
                              c_float, ptr, c_int, c_int]  # fmt: skip
    lib.mxfp4_moe.restype = c_int
    lib.mxfp4_repack_r16.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_gguf_repack_r16.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_gguf_to_hf.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int]
    names = ("mxfp4_gemv", "mxfp4_dequant", "mxfp4_moe_q8", "mxfp4_repack_r16", "mxfp4_gguf_repack_r16", "mxfp4_gguf_to_hf")
    for name in names:
        getattr(lib, name).restype = None


_get = Library(SOURCE, "MXFP4 matmuls", _declare, disable_env="HEARTH_MXFP4_KERNEL")


def available() -> bool:
    return _get() is not None


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    assert blocks.device.type == "cpu" and blocks.dtype == torch.uint8 and blocks.is_contiguous()
    assert scales.dtype == torch.uint8 and scales.is_contiguous()


def gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] float → [M, N] float32; blocks [N, K/32, 16], scales [N, K/32] uint8, contiguous."""
    lib = _get()
    _check(blocks, scales)
    n, groups = scales.shape
    m = x.shape[0]
    assert m <= MAX_M and x.shape[1] == groups * 32
    # per group: [values 0, 2, .., 30 | 1, 3, .., 31], to meet the low / high nibbles of the 16 bytes
    xp = x.float().reshape(m, groups, 16, 2).transpose(-1, -2).contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    lib.mxfp4_gemv(m, n, groups, xp.data_ptr(), blocks.data_ptr(), scales.data_ptr(), out.data_ptr(),
                   torch.get_num_threads())  # fmt: skip
    return out


def dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [N, G, 16], scales [N, G] → float32 [N, G*32] (exact)."""
    lib = _get()
    _check(blocks, scales)
    n, groups = scales.shape
    out = torch.empty(n, groups * 32, dtype=torch.float32)
    lib.mxfp4_dequant(n, groups, blocks.data_ptr(), scales.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


@dataclass(slots=True)
class R16Mxfp4:
    """MXFP4 weights [..., n, k] repacked for `moe_q8`: qs uint8 [..., ceil(n/16), k/32, 256] (16 rows' nibbles per
    block of 32 values), sc uint8 [..., ceil(n/16), k/32, 16] (their e8m0 scales). Rows past n are zero padding."""

    qs: torch.Tensor
    sc: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qs.shape[:-3], self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + self.sc.numel()

    def __getitem__(self, index) -> R16Mxfp4:
        """One expert's (or a leading-dims slice's) weight."""
        return R16Mxfp4(self.qs[index], self.sc[index], self.n, self.k)


def repack(blocks: torch.Tensor, scales: torch.Tensor) -> R16Mxfp4:
    """HF-layout blocks [..., n, G, 16] and scales [..., n, G] -> R16Mxfp4 (same bits, reordered; once, at load).
    In C (mxfp4_repack_r16) when the library is built, else `repack_ref`; the two agree byte for byte."""
    lib = _get()
    if lib is None:
        return repack_ref(blocks, scales)
    *lead, n, groups_k, _ = blocks.shape
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8 and scales.shape == blocks.shape[:-1]
    blocks, scales = blocks.contiguous(), scales.contiguous()
    num_groups = -(-n // 16)
    out = R16Mxfp4(torch.empty(*lead, num_groups, groups_k, 256, dtype=torch.uint8),
                   torch.empty(*lead, num_groups, groups_k, 16, dtype=torch.uint8), n, groups_k * 32)  # fmt: skip
    lib.mxfp4_repack_r16(math.prod(lead), n, groups_k, blocks.data_ptr(), scales.data_ptr(), out.qs.data_ptr(),
                         out.sc.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out


def repack_ref(blocks: torch.Tensor, scales: torch.Tensor) -> R16Mxfp4:
    """`repack` in plain torch (the layout spelled out; the fallback without the C library)."""
    *lead, n, groups_k, _ = blocks.shape
    if lead:  # one [n, G, 16] slice (an expert) at a time, so the temporaries stay that size
        out = R16Mxfp4(torch.empty(*lead, -(-n // 16), groups_k, 256, dtype=torch.uint8),
                       torch.empty(*lead, -(-n // 16), groups_k, 16, dtype=torch.uint8), n, groups_k * 32)  # fmt: skip
        for i, (b, s) in enumerate(zip(blocks.reshape(-1, n, groups_k, 16), scales.reshape(-1, n, groups_k))):
            one = repack_ref(b, s)
            out.qs.view(-1, *one.qs.shape)[i], out.sc.view(-1, *one.sc.shape)[i] = one.qs, one.sc
        return out
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(n, groups_k, 4, 2, 4)  # [c][lo/hi][j]
    qs = codes[..., 0, :] | (codes[..., 1, :] << 4)  # chunk c, byte j: values 8c + j (low) and 8c + 4 + j (high)
    pad = -n % 16
    qs = torch.nn.functional.pad(qs, (0, 0, 0, 0, 0, 0, 0, pad)).reshape((n + pad) // 16, 16, groups_k, 4, 4)
    qs = qs.movedim(1, 3).contiguous()  # [groups, G, 4 chunks, 16 rows, 4]
    sc = torch.nn.functional.pad(scales, (0, 0, 0, pad)).reshape((n + pad) // 16, 16, groups_k)
    return R16Mxfp4(qs.flatten(-3), sc.transpose(-1, -2).contiguous(), n, groups_k * 32)


def repack_gguf(parts: list[torch.Tensor], n: int, k: int) -> R16Mxfp4:
    """GGUF MXFP4 bytes straight to R16Mxfp4, in one pass (no HF-layout copy in between): `parts` are P tensors of
    uint8 [E, n/P rows, k/32 blocks of 17 bytes] (views of the file are read in place), interleaved by row: row r of
    expert e is row r/P of part r%P (GGUF's separate gate and up -> gate_up's alternating rows). In C
    (mxfp4_gguf_repack_r16) when the library is built, else `repack_gguf_ref`; the two agree byte for byte."""
    lib = _get()
    num_parts, groups_k = len(parts), k // 32
    experts = parts[0].shape[0]
    for p in parts:
        assert p.dtype == torch.uint8 and p.numel() == experts * (n // num_parts) * groups_k * 17, "GGUF MXFP4 size"
    assert n % num_parts == 0 and k % 32 == 0
    if lib is None:
        return repack_gguf_ref(parts, n, k)
    parts = [p.contiguous() for p in parts]
    ptrs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64)
    out = R16Mxfp4(huge_pages(torch.empty(experts, -(-n // 16), groups_k, 256, dtype=torch.uint8)),
                   torch.empty(experts, -(-n // 16), groups_k, 16, dtype=torch.uint8), n, k)  # fmt: skip
    lib.mxfp4_gguf_repack_r16(experts, n, groups_k, num_parts, ptrs.data_ptr(), out.qs.data_ptr(), out.sc.data_ptr(),
                              torch.get_num_threads())  # fmt: skip
    return out


def gguf_to_hf(data: torch.Tensor, rows: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 bytes of `rows` x `groups` blocks -> HF-layout (blocks [rows, groups, 16], scales [rows, groups]),
    in one C pass (mxfp4_gguf_to_hf); quant/mxfp4.from_gguf is the torch reference and calls this when built."""
    lib = _get()
    data = data.contiguous()
    assert lib is not None and data.dtype == torch.uint8 and data.numel() == rows * groups * 17
    blocks = torch.empty(rows, groups, 16, dtype=torch.uint8)
    scales = torch.empty(rows, groups, dtype=torch.uint8)
    lib.mxfp4_gguf_to_hf(rows, groups, data.data_ptr(), blocks.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return blocks, scales


def repack_gguf_ref(parts: list[torch.Tensor], n: int, k: int) -> R16Mxfp4:
    """`repack_gguf` in plain torch: each part to the HF layout (quant/mxfp4's from_gguf_ref), rows interleaved, then
    `repack_ref`."""
    from hearth.quant.mxfp4 import from_gguf_ref

    experts, num_parts = parts[0].shape[0], len(parts)
    hf = [from_gguf_ref(p, (experts, n // num_parts, k)) for p in parts]
    blocks = torch.stack([w.blocks for w in hf], dim=2).flatten(1, 2)
    scales = torch.stack([w.scales for w in hf], dim=2).flatten(1, 2)
    return repack_ref(blocks, scales)


def unpack(w: R16Mxfp4) -> tuple[torch.Tensor, torch.Tensor]:
    """R16Mxfp4 -> the HF-layout (blocks [..., n, k/32, 16], scales [..., n, k/32]) it was made from."""
    *lead, groups, groups_k, _ = w.qs.shape
    qs = w.qs.reshape(*lead, groups, groups_k, 4, 16, 4).movedim(-2, -4)  # [..., groups, 16 rows, G, 4 chunks, 4]
    codes = torch.stack([qs & 15, qs >> 4], dim=-2).reshape(*lead, groups * 16, groups_k, 16, 2)  # values in order
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = w.sc.transpose(-1, -2).reshape(*lead, groups * 16, groups_k)
    return blocks[..., : w.n, :, :].contiguous(), scales[..., : w.n, :].contiguous()


def moe_q8(x: torch.Tensor, w: R16Mxfp4, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
    """x [T, K] with rows grouped by expert (counts[i] rows for expert_ids[i], in order) -> [T, N] float32, each row
    times its expert's W^T, with int8 activations. w holds all experts: [E, N, K]."""
    lib = _get()
    t, k = x.shape
    assert k == w.k and w.qs.dim() == 4 and sum(counts) == t and len(counts) == len(expert_ids)
    x = x.float().contiguous()
    starts = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    experts = torch.tensor(expert_ids, dtype=torch.int64)
    out = torch.empty(t, w.n, dtype=torch.float32)
    lib.mxfp4_moe_q8(t, k, w.n, x.data_ptr(), len(counts), experts.data_ptr(), starts.data_ptr(), w.qs.data_ptr(),
                     w.sc.data_ptr(), out.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out


def moe(x: torch.Tensor, gate_up: R16Mxfp4, gate_up_bias: torch.Tensor, down: R16Mxfp4, down_bias: torch.Tensor,
        ids: torch.Tensor, weights: torch.Tensor, alpha: float, limit: float,
        dtype: torch.dtype = torch.float32) -> torch.Tensor | None:  # fmt: skip
    """gpt-oss's MoE for x [T, H] in one C call (mxfp4_moe): for each token, over its experts e = ids[t, s] in
    ascending order, weights[t, s] * (down_e(act(gate_up_e x + gate_up_bias[e])) + down_bias[e]), act the clamped
    SwiGLU of gate_up's (even, odd) rows with `alpha` and `limit`; int8 activations as `moe_q8`, and the float32 steps
    of that torch path. x and the biases bf16 or float32; returns [T, H] in `dtype` (float32 or bf16, rounded once),
    or None for more experts per token than the kernel takes."""
    t, h = x.shape
    experts, i2 = gate_up.qs.shape[0], gate_up.n
    if (gate_up.qs.dim() != 4 or gate_up.k != h or down.n != h or down.k * 2 != i2 or ids.shape != weights.shape
            or ids.shape[0] != t or gate_up_bias.shape != (experts, i2) or down_bias.shape != (experts, h)):  # fmt: skip
        raise ValueError(f"mxfp4 moe: x {tuple(x.shape)}, gate_up {gate_up.shape}, down {down.shape}, ids "
                         f"{tuple(ids.shape)}, weights {tuple(weights.shape)}")  # fmt: skip
    assert dtype in (torch.float32, torch.bfloat16) and gate_up_bias.dtype == down_bias.dtype
    x_bf16, bias_bf16 = x.dtype == torch.bfloat16, gate_up_bias.dtype == torch.bfloat16
    x = x.contiguous() if x_bf16 else x.float().contiguous()
    if not bias_bf16:
        gate_up_bias, down_bias = gate_up_bias.float(), down_bias.float()
    gate_up_bias, down_bias = gate_up_bias.contiguous(), down_bias.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    out = torch.empty(t, h, dtype=dtype)
    rc = _get().mxfp4_moe(t, ids.shape[1], experts, h, i2, ids.data_ptr(), weights.data_ptr(), x.data_ptr(), int(x_bf16),
                          gate_up.qs.data_ptr(), gate_up.sc.data_ptr(), gate_up_bias.data_ptr(), down.qs.data_ptr(),
                          down.sc.data_ptr(), down_bias.data_ptr(), int(bias_bf16), alpha, limit, out.data_ptr(),
                          int(dtype == torch.bfloat16), torch.get_num_threads())  # fmt: skip
    if rc == -1:
        raise ValueError(f"mxfp4 moe: expert ids outside [0, {experts})")
    return out if rc == 0 else None


def moe_q8_ref(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, expert_ids: list[int],
               counts: list[int]) -> torch.Tensor:  # fmt: skip
    """What `moe_q8` computes, in plain torch on the HF-layout weights [E, N, K/32, 16]: x quantized per 32 to int8
    (quantize_q8_ref), each expert's W dequantized exactly, float64 matmuls."""
    from hearth.quant.mxfp4 import dequantize_mxfp4

    q, d = quantize_q8_ref(x)
    xr = (q.double() * d.double()).reshape(x.shape)
    out, start = [], 0
    for expert_id, count in zip(expert_ids, counts):
        weight = dequantize_mxfp4(blocks[expert_id], scales[expert_id], torch.float64)
        out.append(xr[start : start + count] @ weight.t())
        start += count
    return torch.cat(out).float()
