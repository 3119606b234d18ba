"""FP8 block weights under tensor parallelism, in one process (no collectives): each rank keeps its rows / input
columns of the float8 values and the matching block scales; together the ranks hold exactly the dequantized whole;
a shard edge inside a 128×128 block is refused."""

from __future__ import annotations

import pytest
import torch

from hearth.layers.distributed import set_tensor_parallel
from hearth.layers.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from hearth.quant.fp8 import dequantize_fp8_block, quantize_fp8_block


@pytest.fixture
def ranks():
    yield lambda r, size: set_tensor_parallel(r, size)
    set_tensor_parallel(0, 1)


def test_fp8_column_shards_with_a_partial_last_block(ranks):
    """Two fused shards of 256 and 300 rows (the second's last block partial) over 2 ranks: the first splits evenly,
    the second as given (0:128, 128:300, ending at the tensor's end); its even split (150:300) is refused."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(256, 200, generator=gen), torch.randn(300, 200, generator=gen)]
    quantized = [quantize_fp8_block(p) for p in parts]
    whole = torch.cat([dequantize_fp8_block(q, s) for q, s in quantized])
    held = []
    for r in range(2):
        ranks(r, 2)
        ranges = [(128 * r, 128 * (r + 1)), (0, 128) if r == 0 else (128, 300)]
        layer = Fp8ColumnParallelLinear(200, [256, 300], shard_ranges=ranges)
        for i, (q, s) in enumerate(quantized):
            layer.weight_loader(q, "weight", i)
            layer.weight_loader(s, "weight_scale_inv", i)
        layer.finalize(torch.float32, keep_quantized=True)
        held.append(layer.weight.split([128, ranges[1][1] - ranges[1][0]]))
    assert torch.equal(torch.cat([held[0][0], held[1][0], held[0][1], held[1][1]]), whole)
    ranks(1, 2)
    layer = Fp8ColumnParallelLinear(200, [256, 300])  # the even split: 150:300 starts inside a block
    layer.weight_loader(quantized[0][0], "weight", 0)
    with pytest.raises(ValueError, match=r"rows \(150:300 of 300\) cuts the FP8 128×128 blocks"):
        layer.weight_loader(quantized[1][0], "weight", 1)


def test_fp8_row_shards_and_a_cut_block(ranks):
    gen = torch.Generator().manual_seed(1)
    q, s = quantize_fp8_block(torch.randn(72, 384, generator=gen))
    whole = dequantize_fp8_block(q, s)
    for r, (a, b) in enumerate([(0, 256), (256, 384)]):
        ranks(r, 2)
        layer = Fp8RowParallelLinear(384, 72, input_range=(a, b))
        layer.weight_loader(s, "weight_scale_inv")
        layer.weight_loader(q, "weight")
        layer.finalize(torch.float32, keep_quantized=True)
        assert torch.equal(layer.weight, whole[:, a:b])
    layer = Fp8RowParallelLinear(384, 72)  # rank 1 of the even split: columns 192:384
    with pytest.raises(ValueError, match=r"input columns \(192:384 of 384\) cuts"):
        layer.weight_loader(q, "weight")
