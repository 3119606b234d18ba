"""layers/weights.py: the load-time helpers keep a GGUF block tensor in its form and agree with the dense tensor."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.layers.weights import dense, permute_rows, stacked_part
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
@given(rows=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_permute_rows_moves_whole_rows_of_blocks(rows, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, 64)).astype(np.float32)
    perm = torch.from_numpy(rng.permutation(rows))
    qt = q8_0(values)
    moved = permute_rows(qt, perm)
    assert isinstance(moved, QuantizedTensor) and moved.shape == qt.shape
    assert torch.equal(dense(moved), dense(qt)[perm])
    assert torch.equal(permute_rows(dense(qt), perm), dense(qt)[perm])


def test_dense_leaves_plain_tensors_alone():
    t = torch.arange(6.0).reshape(2, 3)
    assert dense(t) is t
