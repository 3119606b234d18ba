"""Weight-only int4 matmul on CPU through PyTorch's packed kernel, with a plain-torch reference.

A group of 32 weights along K shares a scale and a zero: w = (q - 8) * scale + zero, q in [0, 16). GGUF Q4_0 and
Q4_1 map onto this exactly (Q4_1: w = d*q + m, so zero = m + 8d); scales and zeros are held in bf16, which is what the
kernel takes, and the kernel needs bf16 activations to be fast (BENCHMARKS.md).
"""

from __future__ import annotations

import torch


def pack_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """nibbles uint8 [N, K] (0..15), scales/zeros float [N, K/group] -> (packed weight, scales_and_zeros [K/g, N, 2])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    # x: [M, K] -> [M, N], computed in bf16
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size, scales_and_zeros)
    return out.to(x.dtype)


def int4_mm_ref(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    """Dequantize, then matmul, in float32."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    w = (nibbles.float() - 8) * s + z
    return (x.float() @ w.t()).to(x.dtype)
