"""MXFP4: bit-exact dequantization against the spec formula, and the packed matmul paths against `mxfp4_matmul_ref`.

Tolerances: float32 paths differ from the reference only in summation order (≤ 1e-5 relative to the output scale);
bf16 activations are compared after rounding, 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch

from hearth.kernels import mxfp4_cpu
from hearth.quant import mxfp4
from hearth.quant.mxfp4 import FP4_VALUES, Mxfp4Weight, dequantize_mxfp4, mxfp4_matmul, mxfp4_matmul_ref


def random_weight(rows: int, cols: int, seed: int = 0, low: int = 118, high: int = 128):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(low, high, (rows, cols // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def spec_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MODELS.md §1.6 spelled out: W[r, 32g+2k] = LUT[lo] · 2^(s−127), W[r, 32g+2k+1] = LUT[hi] · 2^(s−127)."""
    rows, groups, _ = blocks.shape
    out = torch.empty(rows, groups * 32, dtype=torch.float64)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    for g in range(groups):
        scale = torch.pow(2.0, scales[:, g].double() - 127)[:, None]
        out[:, 32 * g : 32 * g + 32 : 2] = lut[(blocks[:, g] & 0xF).long()] * scale
        out[:, 32 * g + 1 : 32 * g + 32 : 2] = lut[(blocks[:, g] >> 4).long()] * scale
    return out


def test_dequantize_is_bit_exact():
    blocks, scales = random_weight(48, 128, low=0, high=255)  # the whole scale range, subnormal 2^-127 included
    ours = dequantize_mxfp4(blocks, scales)
    torch.testing.assert_close(ours.double(), spec_dequant(blocks, scales), atol=0, rtol=0)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), ours)  # exact in bf16 too
    if mxfp4_cpu.available():
        assert torch.equal(mxfp4_cpu.dequant(blocks.contiguous(), scales.contiguous()), ours)


def test_weight_accepts_flattened_blocks():
    blocks, scales = random_weight(8, 64)
    flat = Mxfp4Weight(blocks.reshape(8, 32), scales)
    assert flat.shape == (8, 64) and flat.nbytes == 8 * 32 + 8 * 2
    assert torch.equal(flat.dequantize(), dequantize_mxfp4(blocks, scales))


@pytest.mark.parametrize("num_rows", [1, 3, 8, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_matmul_matches_reference(num_rows, dtype, use_kernel, monkeypatch):
    if use_kernel and not mxfp4_cpu.available():
        pytest.skip("no C compiler")
    if not use_kernel:
        monkeypatch.setattr(mxfp4_cpu, "available", lambda: False)
        monkeypatch.setattr(mxfp4, "SLAB_BYTES", 64 * 128 * 4)  # force several slabs
    blocks, scales = random_weight(300, 128, seed=num_rows)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_rows, 128, generator=gen).to(dtype)
    bias = torch.randn(300, generator=gen)
    ours = mxfp4_matmul(x, blocks, scales, bias)
    ref = mxfp4_matmul_ref(x, blocks, scales, bias)
    assert ours.dtype == dtype and ours.shape == (num_rows, 300)
    scale = ref.float().abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (ours.float() - ref.float()).abs().max().item() <= tol * scale
