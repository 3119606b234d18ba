"""Helpers for models that reshape checkpoint tensors at load without knowing their formats: a tensor may be a plain
torch tensor or a GGUF `QuantizedTensor` (raw blocks, which run along rows)."""

from __future__ import annotations

import torch

from hearth.quant.gguf_types import QuantizedTensor


def dense(t) -> torch.Tensor:
    """The tensor dequantized when it is a GGUF block tensor, else as given."""
    return t.dequantize() if isinstance(t, QuantizedTensor) else t


def stacked_part(t, index: int):
    """Part `index` of a tensor stacked along its first dimension ([N, rows, cols] → [rows, cols]), kept in its form."""
    if isinstance(t, QuantizedTensor):
        rows = t.shape[1]
        return QuantizedTensor(t.data[index * rows : (index + 1) * rows], t.qtype, tuple(t.shape[1:]))
    return t[index]
