"""DeepSeek's MoE routing in C (elementwise_cpu.grouped_topk) against its plain-torch steps (grouped_topk_ref):
identical expert ids (in the same order) and weights within 1e-6 relative (float32 exp and sums: a few ulps), under
sigmoid and softmax scoring, with and without groups, normalised or not, for decode-sized and larger batches; and
layers.moe.grouped_topk takes the C path."""

from __future__ import annotations

import pytest
import torch

from hearth.kernels import elementwise_cpu

pytestmark = pytest.mark.skipif(not elementwise_cpu.available(), reason="needs a C compiler")


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("num_experts", "top_k", "groups", "topk_group"), [(64, 6, 1, 1), (256, 8, 8, 4), (16, 3, 4, 2),
                                                                            (8, 2, 4, 4), (32, 4, 8, 1)])  # fmt: skip
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 3, 70])
def test_grouped_topk_matches_torch(scoring_func, num_experts, top_k, groups, topk_group, norm, num_tokens):
    g = torch.Generator().manual_seed(num_experts * 7 + num_tokens)
    logits = torch.randn(num_tokens, num_experts, generator=g) * 3
    bias = torch.rand(num_experts, generator=g) * 0.6 - 0.3
    args = (top_k, groups, topk_group, norm, 2.5, scoring_func)
    assert elementwise_cpu.can_grouped_topk(logits, bias)
    weights, ids = elementwise_cpu.grouped_topk(logits, bias, *args)
    ref_w, ref_ids = elementwise_cpu.grouped_topk_ref(logits, bias, *args)
    assert ids.dtype == ref_ids.dtype == torch.long and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    # relative: the weights reach routed_scaling_factor (2.5 here), where 1e-6 is 8 ulps of float32
    assert torch.allclose(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_strided_rows_and_layer_dispatch(monkeypatch):
    """Logit rows further apart than E (a view of a wider buffer) route as their contiguous copy; the layers' router
    calls the C kernel (and falls back to torch for float64 logits)."""
    from hearth.layers import moe

    g = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 80, generator=g)
    logits, bias = wide[:, :64], torch.randn(64, generator=g) * 0.1
    weights, ids = elementwise_cpu.grouped_topk(logits, bias, 6, 8, 3, True, 1.0, "sigmoid")
    ref_w, ref_ids = elementwise_cpu.grouped_topk_ref(logits.contiguous(), bias, 6, 8, 3, True, 1.0, "sigmoid")
    assert torch.equal(ids, ref_ids) and (weights - ref_w).abs().max().item() <= 1e-6
    calls = []
    real = elementwise_cpu.grouped_topk
    monkeypatch.setattr(elementwise_cpu, "grouped_topk", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(moe.grouped_topk(logits, bias, 6, 8, 3)[1], ref_ids) and calls == [1]
    w64, ids64 = moe.grouped_topk(logits.double(), bias, 6, 8, 3)
    assert torch.equal(ids64, ref_ids) and calls == [1]


def test_out_of_range_shapes_fall_back():
    logits = torch.randn(2, 2048)
    assert elementwise_cpu.grouped_topk(logits, torch.zeros(2048), 4, 1, 1) is None
    assert elementwise_cpu.grouped_topk(torch.randn(2, 30), torch.zeros(30), 4, 4, 2) is None  # 4 groups of 7.5
