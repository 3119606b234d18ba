"""Block-scaled FP8 weights as published by DeepSeek-V3/R1: float8_e4m3fn values with one float32 `weight_scale_inv`
per 128×128 block (docs/models.md §2.4). `W[i, j] = float(Wq[i, j]) · S[i // 128, j // 128]`; edge blocks are partial.

How a checkpoint's FP8 weights are held (`fp8_runtime_mode`): on a CUDA device with FP8 support they stay FP8 in
memory (1 byte per weight) and each matmul dequantizes its weight to the compute dtype first ("fp8"); everywhere else
they are dequantized once at load, layer by layer ("dequantized"). Both give the numbers of `dequantize_fp8_block`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK) -> torch.Tensor:  # fmt: skip
    """Reference: fp8 [out, in] × scale_inv [ceil(out/block), ceil(in/block)] broadcast per block, in float32."""
    rows, cols = weight.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv: expected shape {want} for a {tuple(weight.shape)} weight, "
                         f"got {tuple(scale_inv.shape)}")  # fmt: skip
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_fp8_block(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] → (float8_e4m3fn [out, in], float32 scale_inv per block): s = amax / 448 over each
    zero-padded block. Writes test checkpoints and benchmark weights."""
    rows, cols = weight.shape
    num_rb, num_cb = math.ceil(rows / block), math.ceil(cols / block)
    padded = weight.new_zeros(num_rb * block, num_cb * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(num_rb, block, num_cb, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(num_rb * block, num_cb * block)
    return q[:rows, :cols].contiguous(), scale


def fp8_matmul_supported(device: torch.device | str | None = None) -> bool:
    """Whether FP8 weights can stay FP8 on this device: CUDA with compute capability ≥ 8.9 (Ada, Hopper, ...)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_runtime_mode(device: torch.device | str | None = None) -> str:
    """ "fp8" (kept FP8 in memory) or "dequantized" (expanded at load), for `hearth show` and the load log."""
    return "fp8" if fp8_matmul_supported(device) else "dequantized"


@dataclass(slots=True)
class Fp8Weight:
    """An FP8 weight kept packed: `weight` float8_e4m3fn [out, in] and its float32 block scales."""

    weight: torch.Tensor
    scale_inv: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale_inv.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_block(self.weight, self.scale_inv, dtype)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b with W held as FP8: the weight is expanded to x's dtype for this one matmul (weight-only FP8).

    NOTE: an activation-quantized GEMM (`torch._scaled_mm` with per-token-per-128 activation scales, DeepSeek's
    `act_quant`) would also halve the compute; it is not used because it changes the numbers and was not validated
    on a GPU here.
    """
    return F.linear(x, w.dequantize(x.dtype), bias)
