"""MXFP4: bit-exact dequantization against the spec formula, and the packed matmul paths against their references.

| fast path                                  | reference                                         | tolerance (of max |ref|) |
|--------------------------------------------|---------------------------------------------------|--------------------------|
| mxfp4_matmul, float32 x                    | mxfp4_matmul_ref                                  | 1e-5 (summation order)   |
| mxfp4_matmul, bf16 x                       | mxfp4_matmul_ref                                  | 1e-2 (bf16 output)       |
| repack -> unpack (C and torch repack)      | the original blocks / scales                      | exact                    |
| repack in C (mxfp4_repack_r16)             | repack_ref (torch)                                | byte for byte            |
| repack_gguf (GGUF bytes -> R16, C / torch) | from_gguf per part, rows interleaved, repack_ref  | byte for byte            |
| from_gguf in C (mxfp4_gguf_to_hf)          | from_gguf_ref (torch)                             | byte for byte            |
| moe_q8 (int8 x, repacked W), M = 1..20     | moe_q8_ref: same int8 x, exact W, float64         | 1e-5 (float32 rounding)  |
| GptOssExperts in bf16 (grouped moe_q8)     | moe_ref over moe_q8_ref linears / exact experts   | 2^-7 / 5e-2              |
"""

from __future__ import annotations

import math

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
    """docs/models.md §1.6 spelled out: W[r, 32g+2k] = LUT[lo] · 2^(s−127), W[r, 32g+2k+1] = LUT[hi] · 2^(s−127)."""
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


# int8-activation kernel (bf16 serving): repacked weights, x quantized per 32 values. The block dots are exact int32
# sums and every scale is a power of two times the activation scale, so the kernel differs from moe_q8_ref (float64
# on the same quantized x and exactly dequantized W) only by float32 rounding: one product and one sum per block of
# 32, at most K/32 = 12 blocks here, well under 1e-5 of the output scale.
Q8_TOL = 1e-5


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("n,k", [(16, 32), (40, 96), (300, 128), (48, 384), (7, 64)])  # 1, 3 (padded), 19, 3, 1 tiles
@pytest.mark.parametrize("repack", [mxfp4_cpu.repack, mxfp4_cpu.repack_ref], ids=["repack", "repack_ref"])
def test_repack_round_trips(n, k, repack):
    blocks, scales = random_weight(3 * n, k, low=0, high=255)  # 255 (NaN in the spec) would make NaN != NaN
    blocks, scales = blocks.reshape(3, n, k // 32, 16), scales.reshape(3, n, k // 32)
    w = repack(blocks, scales)
    assert w.shape == (3, n, k) and w.nbytes == 3 * (-(-n // 16) * 16) * k * 17 // 32  # the same bits (+ padding rows)
    back_blocks, back_scales = mxfp4_cpu.unpack(w)
    assert torch.equal(back_blocks, blocks) and torch.equal(back_scales, scales)
    assert torch.equal(dequantize_mxfp4(*mxfp4_cpu.unpack(w[1])), dequantize_mxfp4(blocks[1], scales[1]))


@pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler")
@pytest.mark.parametrize("lead,n,k", [((), 16, 32), ((1,), 7, 64), ((3,), 40, 96), ((5,), 300, 128), ((2, 3), 33, 384),
                                      ((4,), 2880, 64)])  # fmt: skip
def test_repack_in_c_equals_torch(lead, n, k):
    """The C repack (mxfp4_repack_r16) writes the same bytes as repack_ref, zero padding rows included."""
    num = math.prod(lead)
    blocks, scales = random_weight(num * n, k, seed=n, low=0, high=256)
    blocks, scales = blocks.reshape(*lead, n, k // 32, 16), scales.reshape(*lead, n, k // 32)
    ours, ref = mxfp4_cpu.repack(blocks, scales), mxfp4_cpu.repack_ref(blocks, scales)
    assert (ours.n, ours.k) == (ref.n, ref.k) and ours.qs.shape == ref.qs.shape and ours.sc.shape == ref.sc.shape
    assert torch.equal(ours.qs, ref.qs) and torch.equal(ours.sc, ref.sc)
    if num > 1:  # a non-contiguous input (every other expert) is copied, not misread
        ours = mxfp4_cpu.repack(blocks.flatten(0, -4)[::2], scales.flatten(0, -3)[::2])
        ref = mxfp4_cpu.repack_ref(blocks.flatten(0, -4)[::2].contiguous(), scales.flatten(0, -3)[::2].contiguous())
        assert torch.equal(ours.qs, ref.qs) and torch.equal(ours.sc, ref.sc)


@pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler")
@pytest.mark.parametrize("lead,cols", [((1,), 32), ((7,), 64), ((3, 40), 96), ((2, 5), 2880)])
def test_from_gguf_in_c_equals_torch(lead, cols):
    """from_gguf (one C pass, mxfp4_gguf_to_hf) writes the same HF-layout bytes as from_gguf_ref (torch)."""
    raw = torch.randint(0, 256, (*lead, cols // 32 * 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    ours, ref = mxfp4.from_gguf(raw, (*lead, cols)), mxfp4.from_gguf_ref(raw, (*lead, cols))
    assert ours.blocks.shape == ref.blocks.shape and ours.scales.shape == ref.scales.shape
    assert torch.equal(ours.blocks, ref.blocks) and torch.equal(ours.scales, ref.scales)


@pytest.mark.parametrize("experts,n,k,parts", [(1, 16, 32, 1), (3, 7, 64, 1), (2, 40, 96, 2), (4, 34, 128, 2),
                                                 (2, 300, 64, 1), (1, 6, 32, 3)])  # fmt: skip
@pytest.mark.parametrize("use_kernel", [True, False], ids=["c", "torch"])
def test_repack_gguf_equals_hf_repack(experts, n, k, parts, use_kernel, monkeypatch):
    """GGUF MXFP4 bytes straight to R16 (mxfp4_gguf_repack_r16, or repack_gguf_ref without the C library) equal the
    HF-layout path: each part through from_gguf, rows interleaved part by part, then repack; padding rows zero."""
    if use_kernel and not mxfp4_cpu.available():
        pytest.skip("no C compiler")
    if not use_kernel:
        monkeypatch.setattr(mxfp4_cpu, "_get", lambda: None)
    gen = torch.Generator().manual_seed(n + k)
    raws = [torch.randint(0, 256, (experts, n // parts, k // 32 * 17), dtype=torch.uint8, generator=gen)
            for _ in range(parts)]  # fmt: skip
    ours = mxfp4_cpu.repack_gguf(raws, n, k)
    hf = [mxfp4.from_gguf(r, (experts, n // parts, k)) for r in raws]
    blocks = torch.stack([w.blocks for w in hf], dim=2).reshape(experts, n, k // 32, 16)
    scales = torch.stack([w.scales for w in hf], dim=2).reshape(experts, n, k // 32)
    ref = mxfp4_cpu.repack_ref(blocks, scales)
    assert ours.shape == (experts, n, k) and ours.qs.shape == ref.qs.shape and ours.sc.shape == ref.sc.shape
    assert torch.equal(ours.qs, ref.qs) and torch.equal(ours.sc, ref.sc)
    back_blocks, back_scales = mxfp4_cpu.unpack(ours)
    assert torch.equal(back_blocks, blocks) and torch.equal(back_scales, scales)
    if parts == 2:  # gate_up's rows alternate gate, up: row 2i of expert 1 is gate's row i
        assert torch.equal(back_blocks[1, 0::2], hf[0].blocks[1]) and torch.equal(back_scales[1, 1::2], hf[1].scales[1])


@pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler")
@pytest.mark.parametrize("n,k", [(40, 96), (300, 128), (48, 384), (16, 32)])
@pytest.mark.parametrize("num_rows", list(range(1, 21)))
def test_moe_q8_matches_reference(n, k, num_rows):
    num_experts = 4
    blocks, scales = random_weight(num_experts * n, k, seed=num_rows)
    blocks, scales = blocks.reshape(num_experts, n, k // 32, 16), scales.reshape(num_experts, n, k // 32)
    gen = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=gen)
    x[:, 5] *= 30  # an outlier channel, as real activations have
    w = mxfp4_cpu.repack(blocks, scales)
    # one expert with all rows, then the rows split over experts in a jumbled order (as grouped_moe passes them)
    for expert_ids, counts in (([2], [num_rows]), ([3, 0, 2][:num_rows], [1] * min(num_rows, 3))):
        counts[-1] += num_rows - sum(counts)
        ref = mxfp4_cpu.moe_q8_ref(x, blocks, scales, expert_ids, counts)
        ours = mxfp4_cpu.moe_q8(x, w, expert_ids, counts)
        assert ours.dtype == torch.float32 and ours.shape == (num_rows, n)
        assert rel_err(ours, ref) <= Q8_TOL


@pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler")
def test_moe_q8_extreme_scales():
    """Block scales across the e8m0 range (2^-127 subnormal up to 2^125, whose values still fit float32) next to a
    block at 2^0, in each of 32 rows: every output stays within rounding of the reference, row by row."""
    blocks, scales = random_weight(32, 64)
    scales[:, 0] = torch.linspace(0, 252, 32).round().to(torch.uint8)
    scales[:, 1] = 127
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 1e-30
    ref = mxfp4_cpu.moe_q8_ref(x, blocks[None], scales[None], [0], [3]).double()
    ours = mxfp4_cpu.moe_q8(x, mxfp4_cpu.repack(blocks[None], scales[None]), [0], [3]).double()
    assert ((ours - ref).abs().amax(0) <= Q8_TOL * ref.abs().amax(0)).all()


@pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler")
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_gpt_oss_bf16_experts_use_the_q8_kernel(num_tokens):
    """bf16 experts load repacked and run grouped through moe_q8: they match the reference loop (moe_ref) whose linears
    are moe_q8_ref on the original blocks, up to the output's bf16 rounding (2^-9 of the largest value) and the down
    projection's int8 inputs, which may round one step apart where the two gate_up outputs differ in float32
    rounding (measured ≤ 3.3e-3 over 39 batch sizes; bound 2^-7); and within int8-activation error (measured ≤ 2%)
    of the exact dequantize-then-matmul experts."""
    from hearth.config import ModelConfig
    from hearth.layers.moe import moe_ref, topk_softmax
    from hearth.models.gpt_oss import GptOssExperts, swiglu_oss

    config = ModelConfig(model_type="gpt_oss", vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_local_experts=6,
                         num_experts_per_tok=2)  # fmt: skip
    gen = torch.Generator().manual_seed(num_tokens)
    experts, raw = GptOssExperts(config), {}
    for name, rows, cols in (("gate_up_proj", 192, 64), ("down_proj", 64, 96)):
        blocks, scales = random_weight(6 * rows, cols, seed=rows, low=119, high=125)
        raw[name] = blocks.reshape(6, rows, cols // 32, 16), scales.reshape(6, rows, cols // 32)
        experts.weight_loader(raw[name][0], f"{name}_blocks")
        experts.weight_loader(raw[name][1], f"{name}_scales")
        raw[f"{name}_bias"] = torch.randn(6, rows, generator=gen).bfloat16()
        experts.weight_loader(raw[f"{name}_bias"], f"{name}_bias")
    experts.finalize(torch.bfloat16)
    assert isinstance(experts.gate_up, mxfp4_cpu.R16Mxfp4) and isinstance(experts.down, mxfp4_cpu.R16Mxfp4)
    hidden_states = torch.randn(num_tokens, 64, generator=gen).bfloat16()
    weights, ids = topk_softmax(torch.randn(num_tokens, 6, generator=gen).bfloat16(), 2)

    def expert_q8_ref(expert_id: int, x: torch.Tensor) -> torch.Tensor:
        def linear(name, x):
            out = mxfp4_cpu.moe_q8_ref(x, *raw[name], [expert_id], [x.shape[0]])
            return out + raw[f"{name}_bias"][expert_id].float()

        return linear("down_proj", swiglu_oss(linear("gate_up_proj", x.float())))

    with torch.inference_mode():
        ours = experts(hidden_states, weights, ids)
        ref = moe_ref(hidden_states.float(), weights.float(), ids, expert_q8_ref)
        exact = moe_ref(hidden_states, weights, ids, experts.expert_ref)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 2**-7
    assert rel_err(ours, exact) <= 0.05  # int8 activations
    # the one-call kernel (mxfp4_cpu.moe) against the two kernel calls and torch steps it replaces: the same float32
    # steps, except the sigmoid's last ulp, which can move an int8 activation of the down projection by one step
    assert experts.swiglu_oss is not None
    with torch.inference_mode():
        experts.swiglu_oss, fused = None, ours
        stepwise = experts(hidden_states, weights, ids)
    assert rel_err(fused, stepwise) <= 2**-7 and (fused == stepwise).float().mean() >= 0.9
    with pytest.raises(ValueError, match="outside"):
        mxfp4_cpu.moe(hidden_states, experts.gate_up, experts.gate_up_bias, experts.down, experts.down_bias, ids + 6,
                      weights, 1.702, 7.0)  # fmt: skip
