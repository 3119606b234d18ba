"""GGUF dequantization in torch against gguf-py's numpy reference (`gguf.quants.dequantize`), bit for bit.

| check                               | tolerance                                   |
|-------------------------------------|---------------------------------------------|
| dequantize vs gguf.quants           | bit-exact (same float32 bits; NaN ≡ NaN)    |
| split_q4_blocks, Q4_1               | bit-exact                                   |
| split_q4_blocks, Q4_0 (min = -8·d)  | ≤ 2 ulp of 8·|d| per element (two roundings) |
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from hearth.quant.gguf_types import SUPPORTED_TYPES, QuantizedTensor, dequantize, split_q4_blocks

ROWS, BLOCKS_PER_ROW = 6, 3
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4, T.BF16)
F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}  # byte offsets of f16 d / dmin in a block


def assert_bits_equal(out: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert out.dtype == torch.float32 and out.shape == ref_t.shape
    nan = torch.isnan(ref_t)
    assert torch.equal(nan, torch.isnan(out))
    assert torch.equal(out[~nan].view(torch.int32), ref_t[~nan].view(torch.int32))


def random_blocks(qtype: T, rng: np.random.Generator, rows: int = ROWS) -> np.ndarray:
    """Random block bytes; f16 scale fields replaced by finite values of varied magnitude."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, BLOCKS_PER_ROW, type_size), dtype=np.uint8)
    scale = rng.standard_normal((rows, BLOCKS_PER_ROW, 2)) * 10.0 ** rng.integers(-6, 2, (rows, BLOCKS_PER_ROW, 2))
    for j, off in enumerate(F16_FIELDS.get(qtype, ())):
        raw[..., off : off + 2] = scale[..., j].astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def quantized_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    weights = rng.standard_normal((ROWS, BLOCKS_PER_ROW * block_size)).astype(np.float32)
    weights[0, :block_size] = 0.0  # an all-zero block (d = 0)
    return quants.quantize(weights, qtype)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (ROWS, BLOCKS_PER_ROW * block_size)
    samples = [random_blocks(qtype, rng)]  # random bytes: also covers inf/NaN scales for 32-element types
    if qtype in QUANTIZABLE:
        samples.append(quantized_blocks(qtype, rng))
    for raw in samples:
        ref = quants.dequantize(raw, qtype) if qtype not in (T.F32, T.F16) else raw.view(
            np.float32 if qtype == T.F32 else np.float16).astype(np.float32)  # fmt: skip
        with np.errstate(all="ignore"):
            assert_bits_equal(dequantize(torch.from_numpy(raw), qtype, shape), ref.reshape(shape))
        qt = QuantizedTensor(torch.from_numpy(raw), int(qtype), shape)
        assert qt.nbytes == raw.size and qt.type_name == qtype.name
        assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_dequantize_3d_and_bad_size() -> None:
    rng = np.random.default_rng(1)
    raw = random_blocks(T.Q8_0, rng, rows=4)
    out = dequantize(torch.from_numpy(raw), T.Q8_0, (2, 2, 96))
    assert torch.equal(out.view(4, 96), dequantize(torch.from_numpy(raw), T.Q8_0, (4, 96)))
    with pytest.raises(ValueError, match="bytes per row"):
        dequantize(torch.from_numpy(raw), T.Q8_0, (5, 96))
    with pytest.raises(ValueError, match="block size"):
        dequantize(torch.from_numpy(raw), T.Q8_0, (4, 100))


@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q4_1), ids=lambda t: t.name)
def test_split_q4_blocks(qtype: T) -> None:
    rng = np.random.default_rng(7)
    raw = quantized_blocks(qtype, rng)
    shape = (ROWS, BLOCKS_PER_ROW * 32)
    qt = QuantizedTensor(torch.from_numpy(raw), int(qtype), shape)
    nibbles, scales, mins = split_q4_blocks(qt)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == shape and int(nibbles.max()) <= 15
    assert scales.shape == mins.shape == (ROWS, BLOCKS_PER_ROW)
    rebuilt = nibbles.float() * scales.repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
    expected = qt.dequantize()
    if qtype == T.Q4_1:
        assert torch.equal(rebuilt, expected)
    else:
        ulp = torch.finfo(torch.float32).eps * 8 * scales.abs().repeat_interleave(32, 1)
        assert bool(((rebuilt - expected).abs() <= 2 * ulp).all())
    with pytest.raises(ValueError, match="Q4_0 or Q4_1"):
        split_q4_blocks(QuantizedTensor(qt.data, int(T.Q8_0), shape))
