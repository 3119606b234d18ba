"""MXFP4 (OCP MX: e2m1 values, one e8m0 scale per 32) as published in gpt-oss checkpoints, and a packed matmul.

HF/original layout (docs/models.md §1.6): `blocks` uint8 [..., rows, G, 16] and `scales` uint8 [..., rows, G], scaling along
the input dimension; byte k of a block holds value 2k in its low nibble and 2k+1 in its high nibble. GGUF MXFP4 packs
the same numbers with the scale first and split halves (low nibbles → values 0..15, high → 16..31); `from_gguf`
converts. `mxfp4_matmul` keeps the weight packed (a fused C kernel for small batches, else a cache-sized slab of rows
dequantized at a time), so memory holds and streams only the packed bytes; `mxfp4_matmul_ref` dequantizes, then
multiplies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SLAB_BYTES = 1 << 20  # dequantized rows per step of mxfp4_matmul: about a core's L2


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """2^(s-127) exactly, as float32 (s = 0 is the subnormal 2^-127; 255, NaN in the spec, becomes +inf)."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] → [..., G*32]; bit-exact (values × powers of two)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    nib = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]: value 2k, 2k+1
    values = lut[nib].flatten(-2)  # [..., G, 32]
    values = values * e8m0_to_float(scales).unsqueeze(-1)
    return values.flatten(-2).to(dtype)


def _byte_lut(dtype: torch.dtype, device) -> torch.Tensor:
    """[256, 2]: the two e2m1 values (low nibble, high nibble) of every byte."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    b = torch.arange(256, device=device)
    return torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).to(dtype)


_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _LUTS:
        _LUTS[key] = _byte_lut(dtype, device)
    return _LUTS[key]


def _dequant_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [n, G, 16], scales [n, G] → [n, G*32] in `dtype` through the byte LUT (exact for bf16/fp32)."""
    n, groups = scales.shape
    pairs = F.embedding(blocks.reshape(n, groups * 16).int(), _lut(dtype, blocks.device))  # [n, G*16, 2]
    values = pairs.view(n, groups, BLOCK) * e8m0_to_float(scales).to(dtype).unsqueeze(-1)
    return values.view(n, groups * BLOCK)


def mxfp4_matmul_ref(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ W^T (+ bias) with W = dequantize(blocks [N, K/32, 16], scales [N, K/32]): dequantize, then matmul."""
    weight = dequantize_mxfp4(blocks, scales, torch.float32)
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ W^T (+ bias) with W kept packed.

    On CPU with the C kernel (kernels/mxfp4_cpu.c): M ≤ 16 rows run a fused dequant-dot in float32; larger M
    dequantize a cache-sized slab of rows at a time and multiply with BLAS. Elsewhere, slabs are dequantized in torch.
    """
    from hearth.kernels import mxfp4_cpu

    n, groups = scales.shape
    k = groups * BLOCK
    use_kernel = x.device.type == "cpu" and mxfp4_cpu.available()
    if use_kernel and x.shape[0] <= mxfp4_cpu.MAX_M:
        out = mxfp4_cpu.gemv(x, blocks, scales).to(x.dtype)
    else:
        dequant = (lambda b, s: mxfp4_cpu.dequant(b, s).to(x.dtype)) if use_kernel else (
            lambda b, s: _dequant_rows(b, s, x.dtype))  # fmt: skip
        rows_per_slab = max(16, SLAB_BYTES // (k * 4))
        out = x.new_empty(x.shape[0], n)
        for r in range(0, n, rows_per_slab):
            e = min(r + rows_per_slab, n)
            torch.matmul(x, dequant(blocks[r:e], scales[r:e]).t(), out=out[:, r:e])
    if bias is not None:
        out += bias.to(out.dtype)
    return out


@dataclass(slots=True)
class Mxfp4Weight:
    """Packed MXFP4 weights of shape [..., rows, cols]; `blocks` [..., rows, cols/32, 16], `scales` [..., rows, cols/32]."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.blocks.dim() == self.scales.dim():  # flattened (…, rows, cols/2) variant
            self.blocks = self.blocks.reshape(*self.blocks.shape[:-1], -1, 16)
        if self.blocks.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise ValueError(f"MXFP4 blocks/scales must be uint8, got {self.blocks.dtype}/{self.scales.dtype}")
        if tuple(self.blocks.shape[:-1]) != tuple(self.scales.shape) or self.blocks.shape[-1] != 16:
            raise ValueError(f"MXFP4 blocks {tuple(self.blocks.shape)} do not match scales {tuple(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks, self.scales, dtype)

    def __getitem__(self, index) -> Mxfp4Weight:
        return Mxfp4Weight(self.blocks[index], self.scales[index])

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, cols] → [M, rows] for a 2-D weight."""
        return mxfp4_matmul(x, self.blocks, self.scales, bias)


def from_gguf(data: torch.Tensor, shape: tuple[int, ...]) -> Mxfp4Weight:
    """GGUF MXFP4 bytes (17-byte blocks: e8m0 scale, then 16 bytes with values k / k+16 in the low / high nibbles)
    of a tensor of logical `shape` [..., rows, cols] → HF-layout Mxfp4Weight."""
    *lead, cols = shape
    from hearth.kernels import mxfp4_cpu

    rows, groups = math.prod(lead), cols // BLOCK
    if mxfp4_cpu.available() and data.numel() * data.element_size() == rows * groups * 17:  # one pass in C
        blocks, scales = mxfp4_cpu.gguf_to_hf(data.contiguous().view(torch.uint8).reshape(-1), rows, groups)
        return Mxfp4Weight(blocks.reshape(*lead, groups, 16), scales.reshape(*lead, groups))
    return from_gguf_ref(data, shape)


def from_gguf_ref(data: torch.Tensor, shape: tuple[int, ...]) -> Mxfp4Weight:
    """`from_gguf` in plain torch."""
    *lead, cols = shape
    raw = data.contiguous().view(torch.uint8).reshape(*lead, cols // BLOCK, 17)
    scales = raw[..., 0].contiguous()
    qs = raw[..., 1:]
    values = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [..., G, 32] codes in value order
    blocks = values[..., 0::2] | (values[..., 1::2] << 4)
    if math.prod(lead) * cols // BLOCK != scales.numel():
        raise ValueError(f"GGUF MXFP4 data does not hold shape {shape}")
    return Mxfp4Weight(blocks.contiguous(), scales)
