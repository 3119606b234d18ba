"""GGUF tensor types held as raw blocks, and their dequantization in vectorized torch.

Bit-exact ports of gguf-py's `quants.py` (itself a port of ggml): same f16→f32 conversions, same float32 op order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

QK_K = 256
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4)
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled as in ggml


def type_name(qtype: int) -> str:
    try:
        return T(qtype).name
    except ValueError:
        return f"type {qtype}"


def row_nbytes(qtype: int, num_cols: int) -> int:
    """Bytes of one row of `num_cols` elements; raises ValueError if blocks do not tile the row."""
    block_size, type_size = GGML_QUANT_SIZES[T(qtype)]
    if num_cols % block_size:
        raise ValueError(f"row length {num_cols} is not a multiple of the {type_name(qtype)} block size {block_size}")
    return num_cols // block_size * type_size


@dataclass(slots=True)
class QuantizedTensor:
    """Raw GGUF blocks of one weight; blocks run along the last (contiguous) axis.

    `data` is uint8 [rows, bytes_per_row], row-major in HF order (rows = out features, or experts × out features for
    3-D expert weights); `shape` is the logical shape, e.g. (rows, cols).
    """

    data: torch.Tensor
    qtype: int
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian f16 bytes → [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[n, k] bytes → [n, len(shifts), k] of (byte >> shift) & mask."""
    sh = torch.tensor(shifts, dtype=torch.uint8).view(1, -1, 1)
    return (b.unsqueeze(1) >> sh) & mask


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _bits(blocks[:, 2:], (0, 4), 0xF).flatten(1).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _bits(blocks[:, 4:], (0, 4), 0xF).flatten(1).float()
    return d * q + m


def _q5(blocks: torch.Tensor, has_min: bool) -> torch.Tensor:
    o = 4 if has_min else 2
    d = _f16(blocks[:, :2])
    qh = _bits(blocks[:, o : o + 4], tuple(range(8)), 1).transpose(1, 2).flatten(1)  # bit k of the u32 qh
    ql = _bits(blocks[:, o + 4 :], (0, 4), 0xF).flatten(1)
    q = ql | (qh << 4)
    if has_min:
        return d * q.float() + _f16(blocks[:, 2:4])
    return d * (q.to(torch.int8) - 16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks[:, :2])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit sub-block scales and mins of Q4_K/Q5_K, [n, 8] each."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q45_k(blocks: torch.Tensor, has_qh: bool) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    qs = blocks[:, 48:] if has_qh else blocks[:, 16:]
    q = _bits(qs.reshape(n * 4, 32), (0, 4), 0xF).view(n, 8, 32)  # chunk c: low nibbles → 2c, high → 2c+1
    if has_qh:
        q = q | (_bits(blocks[:, 16:48], tuple(range(8)), 1) << 4)  # bit s of qh[l] → sub-block s
    return (d * q.float() - dm).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks[:, 208:210]) * scales).view(n, 16, 1)
    ql = _bits(blocks[:, :128].reshape(n * 2, 64), (0, 4), 0xF).view(n, 8, 32)
    qh = _bits(blocks[:, 128:192].reshape(n * 2, 32), (0, 2, 4, 6), 0x3).view(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).view(n, 16, 16).float()
    return (d * q).view(n, QK_K)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    e = blocks[:, :1].to(torch.int32)
    # ggml_e8m0_to_fp32_half: 2^(e-128) as float32 bits, subnormal for e < 2
    d = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    nib = _bits(blocks[:, 1:], (0, 4), 0xF).flatten(1).long()
    return d * torch.tensor(MXFP4_VALUES, dtype=torch.float32)[nib]


_BLOCK_DEQUANT = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: lambda b: _q5(b, has_min=False),
    T.Q5_1: lambda b: _q5(b, has_min=True),
    T.Q8_0: _q8_0,
    T.Q4_K: lambda b: _q45_k(b, has_qh=False),
    T.Q5_K: lambda b: _q45_k(b, has_qh=True),
    T.Q6_K: _q6_k,
    T.MXFP4: _mxfp4,
}


def dequantize(data: torch.Tensor, qtype: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any shape whose rows hold whole blocks) → float32 tensor of `shape`."""
    shape = tuple(int(s) for s in shape)
    qtype = T(qtype)
    raw = data.contiguous().view(torch.uint8).reshape(-1)
    if raw.numel() != math.prod(shape[:-1]) * row_nbytes(qtype, shape[-1]):
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {row_nbytes(qtype, shape[-1])} bytes per row, "
                         f"got {raw.numel()} bytes in all")  # fmt: skip
    if qtype == T.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == T.F16:
        return raw.view(torch.float16).float().reshape(shape)
    if qtype == T.BF16:
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    fn = _BLOCK_DEQUANT.get(qtype)
    if fn is None:
        raise NotImplementedError(f"dequantization of {qtype.name} is not supported")
    _, type_size = GGML_QUANT_SIZES[qtype]
    return fn(raw.view(-1, type_size)).reshape(shape)


def split_q4_blocks(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1 → (nibbles uint8 [rows, cols], scales f32 [rows, cols//32], mins f32 [rows, cols//32]).

    `nib * scale + min` equals `dequantize()` exactly for Q4_1; for Q4_0 (min = -8·d) it can differ by float32 rounding,
    at most 2 ulp of 8·|d| per element, because `d·(nib−8)` is rounded once and `d·nib − 8d` twice.
    """
    if qt.qtype not in (T.Q4_0, T.Q4_1):
        raise ValueError(f"split_q4_blocks needs Q4_0 or Q4_1, got {qt.type_name}")
    rows, cols = math.prod(qt.shape[:-1]), qt.shape[-1]
    blocks = qt.data.reshape(-1, GGML_QUANT_SIZES[T(qt.qtype)][1])
    o = 2 if qt.qtype == T.Q4_0 else 4
    nibbles = _bits(blocks[:, o:], (0, 4), 0xF).reshape(rows, cols)
    scales = _f16(blocks[:, :2]).reshape(rows, cols // 32)
    mins = scales * -8.0 if qt.qtype == T.Q4_0 else _f16(blocks[:, 2:4]).reshape(rows, cols // 32)
    return nibbles, scales, mins
