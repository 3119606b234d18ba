"""The bf16 matrix-vector kernel (hearth/kernels/bf16_cpu.c) against exact float64 products and torch's F.linear.

Both the kernel and F.linear sum bf16 products in float32 (in different orders) and round the result to bf16 once,
so each is within half a bf16 step of the exact value plus float32 summation error: 2^-8 of the largest |output|
(bf16 has 8 significant bits) bounds both, and they differ from each other by at most one bf16 step of that size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hearth.kernels import bf16_cpu

pytestmark = pytest.mark.skipif(not bf16_cpu.fast(), reason="no C compiler or no AVX-512 BF16")
TOL = 2**-8


@pytest.mark.parametrize("n,k", [(37, 100), (64, 2880), (5, 31), (130, 576), (8, 4096)])  # K % 64 and % 32 != 0, N % 4
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("has_bias", [True, False])
def test_gemv_matches_exact_and_torch(n, k, m, has_bias):
    gen = torch.Generator().manual_seed(n * m + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16() if has_bias else None
    ours = bf16_cpu.gemv(x, weight, bias)
    theirs = F.linear(x, weight, bias)
    exact = bf16_cpu.gemv_ref(x, weight, bias)
    scale = exact.abs().max().item()
    assert ours.dtype == torch.bfloat16 and ours.shape == (m, n)
    assert (ours.double() - exact).abs().max().item() <= TOL * scale
    assert (ours.double() - theirs.double()).abs().max().item() <= TOL * scale


@pytest.mark.parametrize("heads,n,k", [(16, 512, 128), (16, 128, 512), (3, 37, 100)])  # MLA's W_UK^T, W_UV; odd sizes
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_heads_matches_exact_and_each_head_alone(heads, n, k, m):
    gen = torch.Generator().manual_seed(heads * n + k + m)
    x = torch.randn(heads, m, k, generator=gen).bfloat16()
    weight = torch.randn(heads, n, k, generator=gen).bfloat16()
    ours = bf16_cpu.gemv_heads(x, weight)
    exact = bf16_cpu.gemv_heads_ref(x, weight)
    assert ours.dtype == torch.bfloat16 and ours.shape == (heads, m, n)
    assert (ours.double() - exact).abs().max().item() <= TOL * exact.abs().max().item()
    for h in range(heads):  # the same arithmetic as one head's gemv
        assert torch.equal(ours[h], bf16_cpu.gemv(x[h], weight[h]))


def test_linear_uses_the_kernel_for_a_few_rows():
    from hearth.layers.linear import Linear

    layer = Linear(96, 40, bias=True)
    gen = torch.Generator().manual_seed(0)
    layer.weight_loader(torch.randn(40, 96, generator=gen))
    layer.weight_loader(torch.randn(40, generator=gen), "bias")
    layer.finalize(torch.bfloat16)
    for shape in [(1, 96), (4, 96), (2, 2, 96), (5, 96)]:  # 5 rows: torch
        x = torch.randn(*shape, generator=gen).bfloat16()
        assert bf16_cpu.can_run(x, layer.weight) == (x.numel() // 96 <= bf16_cpu.MAX_M)
        out = layer(x)
        exact = bf16_cpu.gemv_ref(x.reshape(-1, 96), layer.weight, layer.bias).reshape(*shape[:-1], 40)
        assert out.shape == (*shape[:-1], 40) and out.dtype == torch.bfloat16
        assert (out.double() - exact).abs().max().item() <= TOL * exact.abs().max().item()


def test_heads_mm_uses_the_kernel_for_bf16_and_torch_otherwise(monkeypatch):
    from hearth.layers.linear import heads_mm

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 1, 64, generator=gen), torch.randn(4, 32, 64, generator=gen)
    exact = bf16_cpu.gemv_heads_ref(x.bfloat16(), weight.bfloat16())
    assert torch.equal(heads_mm(x.bfloat16(), weight.bfloat16()), bf16_cpu.gemv_heads(x.bfloat16(), weight.bfloat16()))
    assert (heads_mm(x.bfloat16(), weight).double() - exact).abs().max() <= TOL * exact.abs().max()  # weight cast
    torch.testing.assert_close(heads_mm(x, weight), torch.bmm(x, weight.transpose(1, 2)))  # float32: torch
    monkeypatch.setattr(bf16_cpu, "gemv_heads", lambda *a: pytest.fail("five rows are past the kernel's range"))
    heads_mm(torch.randn(4, 5, 64).bfloat16(), weight.bfloat16())
