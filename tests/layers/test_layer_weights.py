"""layers/weights.py: the load-time helpers keep a GGUF block tensor in its form and agree with the dense tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.layers.weights import dense, stacked_part
from hearth.quant.gguf_types import QuantizedTensor


def q8_0(values: np.ndarray) -> QuantizedTensor:
    """A float array [..., rows, cols] as a Q8_0 QuantizedTensor with rows = the product of the leading dims."""
    raw = quants.quantize(values.reshape(-1, values.shape[-1]).astype(np.float32), T.Q8_0)
    return QuantizedTensor(torch.from_numpy(raw.copy()), int(T.Q8_0), tuple(values.shape))


@settings(max_examples=25, deadline=None)
@given(experts=st.integers(1, 4), rows=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_stacked_part_is_the_slice_of_the_dequantized_tensor(experts, rows, blocks, seed):
    values = np.random.default_rng(seed).standard_normal((experts, rows, 32 * blocks)).astype(np.float32)
    qt = q8_0(values)
    full = dense(qt).reshape(experts, rows, 32 * blocks)
    for e in range(experts):
        part = stacked_part(qt, e)
        assert isinstance(part, QuantizedTensor) and part.shape == (rows, 32 * blocks)
        assert torch.equal(dense(part), full[e])
        assert torch.equal(stacked_part(full, e), full[e])


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 4), heads=st.integers(1, 3), half=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_deinterleaved_rotate_half_rope_is_the_interleaved_rope(tokens, heads, half, seed):
    """DeepSeek's rope pairs dims (2i, 2i+1): its values put in rotate-half order and rotated by the rotate-half tables
    are the interleaved rotation's values in that order."""
    from hearth.layers.rotary import apply_rotary_emb, deinterleave_pairs

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, 2 * half, generator=gen, dtype=torch.float64)
    angles = torch.rand(tokens, half, generator=gen, dtype=torch.float64) * 6
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    want = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)  # interleaved, directly
    got = apply_rotary_emb(deinterleave_pairs(x), torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    torch.testing.assert_close(got, deinterleave_pairs(want), rtol=1e-12, atol=1e-12)
    assert deinterleave_pairs(x).is_contiguous() and torch.equal(deinterleave_pairs(x)[..., :half], even)


def test_dense_leaves_plain_tensors_alone():
    t = torch.arange(6.0).reshape(2, 3)
    assert dense(t) is t


def test_a_bf16_weight_requantized_to_q8_0_reads_its_blocks_within_q8_0_error() -> None:
    """--lm-head-int8: a dense bf16 weight becomes Q8_0 blocks in the C kernels' form; outputs stay within Q8_0's
    rounding of the dense product, in prefill (dequantized) and decode (int8 activations) arithmetic alike."""
    from hearth.kernels import gguf_cpu
    from hearth.layers.context import Context, reset_context, set_context
    from hearth.layers.linear import BlocksMethod, Linear

    if not gguf_cpu.available():
        pytest.skip("no C compiler: the Q8_0 blocks need the C kernels")
    torch.manual_seed(0)
    lin = Linear(256, 96)
    lin.weight_loader(torch.randn(96, 256).to(torch.bfloat16))
    lin.finalize(torch.bfloat16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    dense = lin(x).float()
    assert lin.requantize_q8_0() and isinstance(lin.method, BlocksMethod) and lin.quant_type == "Q8_0"
    scale = dense.abs().max()
    assert (lin(x).float() - dense).abs().max() / scale < 0.02
    set_context(Context(decode_seq_idx=[0, 1, 2]))  # a decode step: int8 activations on the packed weight
    try:
        assert (lin(x).float() - dense).abs().max() / scale < 0.03
    finally:
        reset_context()
    assert not lin.requantize_q8_0()  # already blocks
    f32 = Linear(256, 96)
    f32.weight_loader(torch.randn(96, 256))
    f32.finalize(torch.float32)
    assert not f32.requantize_q8_0()  # the float32 reference mode keeps its dense weight


def test_lm_head_int8_requantizes_an_untied_head(tiny_llama3) -> None:
    from hearth import LLM, SamplingParams
    from hearth.kernels import gguf_cpu
    from hearth.layers.linear import BlocksMethod, DenseMethod

    if not gguf_cpu.available():
        pytest.skip("no C compiler: the Q8_0 blocks need the C kernels")
    path, _ = tiny_llama3
    plain = LLM(path, max_model_len=64, dtype="bfloat16")
    quant = LLM(path, max_model_len=64, dtype="bfloat16", lm_head_int8=True)
    assert isinstance(plain.engine.runner.model.lm_head.method, DenseMethod)
    assert isinstance(quant.engine.runner.model.lm_head.method, BlocksMethod)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = quant.generate([[1, 2, 3, 4]], params)[0]
    assert len(out.token_ids) == 4
