"""Weight-only int4 matmul on CPU through PyTorch's packed kernel, with a plain-torch reference.

A group of 32 weights along K shares a scale and a zero: w = (q - 8) * scale + zero, q in [0, 16). GGUF Q4_0 and
Q4_1 map onto this exactly (Q4_1: w = d*q + m, so zero = m + 8d); scales and zeros are held in bf16, which is what the
kernel takes, and the kernel needs bf16 activations to be fast (docs/performance.md, Method).

For many tokens at once (prefill) a dense bf16 matmul beats the int4 kernel, so `dequantize_int4` unpacks the packed
weight back to bf16 on the fly. It reads the CPU packing that `_convert_weight_to_int4pack_for_cpu` writes with
AVX-512 (blocks of 64 rows, each stored K-major as 32 bytes per k: low nibble row j, high nibble row j + 32); the layout
is checked once per process against the packer, and `can_dequantize` is False where it differs.
"""

from __future__ import annotations

import functools

import torch

BLOCK_N = 64


def pack_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """nibbles uint8 [N, K] (0..15), scales/zeros float [N, K/group] -> (packed weight, scales_and_zeros [K/g, N, 2])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    # x: [M, K] -> [M, N], computed in bf16
    if x.dtype != torch.bfloat16:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size,
                                                          scales_and_zeros).to(x.dtype)  # fmt: skip
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The packed CPU weight -> nibbles uint8 [K, N] (transposed: the layout is K-major inside each block)."""
    blocks = packed.view(n // BLOCK_N, k, BLOCK_N // 2)
    nibbles = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [N/64, K, 64]
    return nibbles.transpose(0, 1).reshape(k, n)


@functools.cache
def _layout_matches(n: int, k: int) -> bool:
    if n % BLOCK_N or k % 2:
        return False
    q = (torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return packed.shape == (n, k // 2) and torch.equal(unpack_int4(packed, n, k), q.t().to(torch.uint8))


def can_dequantize(n: int, k: int) -> bool:
    return _layout_matches(n, k)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int, group_size: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """The packed weight -> W^T [K, N] in `dtype`: (q - 8) * scale + zero computed in float32, rounded once."""
    q = unpack_int4(packed, n, k).view(k // group_size, group_size, n)
    scales = scales_and_zeros[:, None, :, 0].float()  # [K/g, 1, N]
    zeros = scales_and_zeros[:, None, :, 1].float() - 8 * scales
    return torch.addcmul(zeros, q, scales).view(k, n).to(dtype)


def int4_mm_dense(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                  group_size: int) -> torch.Tensor:  # fmt: skip
    """Same product as `int4_mm`, through a bf16 dense matmul on the weight dequantized now (faster for large M)."""
    n, k = scales_and_zeros.shape[1], x.shape[-1]
    w_t = dequantize_int4(packed, scales_and_zeros, n, k, group_size)
    return (x.to(torch.bfloat16) @ w_t).to(x.dtype)


def int4_mm_ref(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    """Dequantize, then matmul, in float32."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    w = (nibbles.float() - 8) * s + z
    return (x.float() @ w.t()).to(x.dtype)
