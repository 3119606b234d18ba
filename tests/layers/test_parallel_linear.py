"""The parallel layers' shards in one process (no collectives): what each rank keeps at load, and the split rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hearth.config import head_partition
from hearth.layers.distributed import set_tensor_parallel
from hearth.layers.linear import ColumnParallelLinear, Linear, QKVParallelLinear, RowParallelLinear
from hearth.quant.gguf_types import QuantizedTensor


@pytest.fixture
def ranks():
    """Build layers as rank r of `size` (set_tensor_parallel), then back to one rank."""
    yield lambda r, size: set_tensor_parallel(r, size)
    set_tensor_parallel(0, 1)


def q8_0(w: torch.Tensor) -> QuantizedTensor:
    data = quants.quantize(w.numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
    return QuantizedTensor(torch.from_numpy(data), int(GGMLQuantizationType.Q8_0), tuple(w.shape))


def test_head_partition():
    # 9 query heads over 3 KV heads on 2 ranks (SmolLM2): 1 KV group, then 2
    assert [head_partition(9, 3, r, 2) for r in range(2)] == [(0, 3, 0, 1), (3, 6, 1, 2)]
    # fewer KV heads than ranks: each rank a copy of the KV head its query heads read
    assert [head_partition(8, 2, r, 4) for r in range(4)] == [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    with pytest.raises(ValueError, match="cannot be split"):
        head_partition(6, 2, 0, 4)


def test_row_and_column_shards_rebuild_the_whole_layer(ranks):
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(24, 64, generator=gen), torch.randn(24, generator=gen), torch.randn(5, 64, generator=gen)
    full = Linear(64, 24, bias=True)
    full.weight_loader(w)
    full.weight_loader(b, "bias")
    full.finalize(torch.float32)
    want = full(x)
    partial, outputs = torch.zeros(5, 24), []
    for r in range(2):
        ranks(r, 2)
        row = RowParallelLinear(64, 24, bias=True)
        row.weight_loader(w)
        row.weight_loader(b, "bias")
        row.finalize(torch.float32)
        assert row.weight.shape == (24, 32)
        partial += row.method.apply_wide(x[:, 32 * r : 32 * (r + 1)])
        col = ColumnParallelLinear(64, [24], bias=True)
        col.weight_loader(w)
        col.weight_loader(b, "bias")
        col.finalize(torch.float32)
        outputs.append(col(x))
    torch.testing.assert_close(partial + b, want)
    torch.testing.assert_close(torch.cat(outputs, -1), want)


def test_qkv_shards_follow_the_heads(ranks):
    head_dim, heads, kv_heads = 4, 4, 2
    q, k, v = (torch.arange(n * head_dim * 8, dtype=torch.float32).view(n * head_dim, 8) for n in (heads, kv_heads, kv_heads))
    for r in range(2):
        ranks(r, 2)
        qkv = QKVParallelLinear(8, head_dim, heads, kv_heads)
        for i, t in enumerate((q, k, v)):
            qkv.weight_loader(t, "weight", i)
        qkv.finalize(torch.float32)
        assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
        rows = slice(8 * r, 8 * (r + 1)), slice(4 * r, 4 * (r + 1))
        torch.testing.assert_close(qkv.weight, torch.cat([q[rows[0]], k[rows[1]], v[rows[1]]]))


def test_gguf_row_split_on_block_edges_or_refused(ranks):
    gen = torch.Generator().manual_seed(1)
    ok = q8_0(torch.randn(8, 128, generator=gen))  # 64 columns per rank: two Q8_0 blocks
    ranks(1, 2)
    layer = RowParallelLinear(128, 8)
    layer.weight_loader(ok)
    layer.finalize(torch.float32)
    torch.testing.assert_close(layer.weight, ok.dequantize()[:, 64:])
    odd = q8_0(torch.randn(8, 96, generator=gen))  # 48 columns per rank: not whole blocks
    with pytest.raises(ValueError, match="does not fall on the 32-value blocks"):
        RowParallelLinear(96, 8).weight_loader(odd)
