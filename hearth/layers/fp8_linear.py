"""Linear layers that load DeepSeek's FP8 block weights (float8_e4m3fn with 128×128 block scales, quant/fp8.py).

The layer chooses the form: on a device with FP8 matmuls the weight stays FP8 in memory and runs through
quant/fp8's `fp8_linear`; elsewhere it is dequantized at load and runs as any other `Linear`.

Under tensor parallelism `Fp8ColumnParallelLinear` / `Fp8RowParallelLinear` keep a rank's rows / input columns of the
FP8 values and the matching rows / columns of block scales. A shard must start and end on the 128×128 block edges (or
at the tensor's end), so that every scale belongs to one rank; a tensor-parallel size that would cut a block is
refused at load with the tensor's name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from hearth.layers.linear import ColumnParallelLinear, Linear, LinearMethod, RowParallelLinear
from hearth.quant.fp8 import BLOCK, Fp8Weight, dequantize_fp8_block, fp8_linear, fp8_runtime_mode

logger = logging.getLogger(__name__)


def default_fp8_mode() -> str:
    """What FP8 block weights become on the default device: "fp8" (kept) or "dequantized"."""
    return fp8_runtime_mode(torch.get_default_device())


@dataclass(eq=False)
class Fp8Method(LinearMethod):
    """FP8 block weights kept FP8 in memory (a device with FP8 matmuls)."""

    fp8: Fp8Weight

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, self.fp8, bias)


class Fp8Linear(Linear):
    """Linear that also loads FP8 block weights (`weight` in float8_e4m3fn plus `weight_scale_inv`).

    With `keep_fp8` (a CUDA device with FP8, see quant/fp8.py) the weight stays FP8 in memory; otherwise it is
    dequantized in `finalize`, then held like any other weight. The model sets it once for all its FP8 linears
    (`set_fp8_mode`): asking for the default device per layer cost ~15 µs each, a visible share of building a model of
    thousands of expert linears.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, output_sizes: list[int] | None = None):
        super().__init__(in_features, out_features, bias, output_sizes)
        self.keep_fp8 = False
        self._scale_invs: dict[int, torch.Tensor] = {}

    fp8 = property(lambda self: self._held(Fp8Method, "fp8"))

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if kind == "weight_scale_inv":
            self._scale_invs[shard_id] = tensor
            return
        super().weight_loader(tensor, kind, shard_id)

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        fp8_ids = sorted(i for (kind, i), t in self._shards.items()
                         if kind == "weight" and getattr(t, "dtype", None) == torch.float8_e4m3fn)  # fmt: skip
        if fp8_ids != sorted(self._scale_invs):
            raise ValueError(f"FP8 weight shards {fp8_ids} and weight_scale_inv shards {sorted(self._scale_invs)} "
                             "do not pair up")  # fmt: skip
        if fp8_ids:
            self.quant_type = "fp8_block"
            if keep_quantized and self.keep_fp8 and self._can_keep_fp8(fp8_ids):
                self._keep_fp8(dtype)
                return
            for i in fp8_ids:
                self._shards[("weight", i)] = dequantize_fp8_block(self._shards[("weight", i)], self._scale_invs[i])
            self._scale_invs.clear()
        super().finalize(dtype, keep_quantized)

    def _can_keep_fp8(self, fp8_ids: list[int]) -> bool:
        """All shards FP8 and shard boundaries on block edges."""
        return len(fp8_ids) == len(self.output_sizes) and not any(s % BLOCK for s in self.output_sizes[:-1])

    def _keep_fp8(self, dtype: torch.dtype) -> None:
        n = len(self.output_sizes)
        weight = torch.cat([self._shards[("weight", i)] for i in range(n)])
        self.method = Fp8Method(Fp8Weight(weight.contiguous(), torch.cat([self._scale_invs[i].float() for i in range(n)])))
        if self.has_bias:
            self.bias = torch.cat([self._shards[("bias", i)] for i in range(n)]).to(dtype)
        self._shards.clear()
        self._scale_invs.clear()

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [out, in] tensor (for MLA's absorbed form, which needs per-head views)."""
        if self.fp8 is not None:
            return self.fp8.dequantize(dtype)
        if self.weight is None:
            raise ValueError("weight is held quantized; load this layer dense")
        return self.weight


def set_fp8_mode(model: nn.Module) -> str:
    """Every Fp8Linear of `model` (built on the default device) keeps FP8 weights in memory or not, as the device
    can; returns the mode."""
    mode = default_fp8_mode()
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.keep_fp8 = mode == "fp8"
    return mode


def fp8_mode(model: nn.Module, dtype: torch.dtype) -> str | None:
    """How a loaded model holds its FP8 block linears: "fp8" (all kept), "dequantized", "mixed", or None (none).
    Logs the count once."""
    num_fp8 = sum(1 for m in model.modules() if getattr(m, "quant_type", None) == "fp8_block")
    if not num_fp8:
        return None
    kept = sum(1 for m in model.modules() if getattr(m, "fp8", None) is not None)
    logger.info("FP8 block weights: %d linears, %s", num_fp8,
                "kept FP8 in memory" if kept else f"dequantized to {dtype} at load")  # fmt: skip
    return "fp8" if kept == num_fp8 else "dequantized" if not kept else "mixed"


def _is_fp8(tensor) -> bool:
    return getattr(tensor, "dtype", None) == torch.float8_e4m3fn


def fp8_shard(tensor: torch.Tensor, kind: str, dim: int, start: int, end: int, full: int) -> torch.Tensor:
    """Rows (dim 0) or input columns (dim 1) start:end of an FP8 `weight` out of `full`, or the block scales
    (`weight_scale_inv`) that go with them, copied. ValueError when start or end falls inside a 128-wide block."""
    for edge in (start, end):
        if edge % BLOCK and edge != full:
            what = "rows" if dim == 0 else "input columns"
            raise ValueError(f"a tensor-parallel shard of the {what} ({start}:{end} of {full}) cuts the FP8 "
                             f"{BLOCK}×{BLOCK} blocks; use a tensor-parallel size that splits them on block edges")  # fmt: skip
    if kind == "weight_scale_inv":
        start, end = start // BLOCK, -(-end // BLOCK)
    return tensor.narrow(dim, start, end - start).clone()


class Fp8ColumnParallelLinear(ColumnParallelLinear, Fp8Linear):
    """ColumnParallelLinear that also loads FP8 block weights (each fused shard's rows cut on block edges)."""

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if self.tp_size > 1 and (kind == "weight_scale_inv" or (kind == "weight" and _is_fp8(tensor))):
            full = self.full_sizes[shard_id]
            if kind == "weight" and tensor.shape[0] != full:
                raise ValueError(f"weight shard {shard_id}: expected {full} rows, got {tensor.shape[0]}")
            tensor = fp8_shard(tensor, kind, 0, *self.shard_ranges[shard_id], full)
            return Fp8Linear.weight_loader(self, tensor, kind, shard_id)
        super().weight_loader(tensor, kind, shard_id)


class Fp8RowParallelLinear(RowParallelLinear, Fp8Linear):
    """RowParallelLinear that also loads FP8 block weights (input columns cut on block edges)."""

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if self.tp_size > 1 and (kind == "weight_scale_inv" or (kind == "weight" and _is_fp8(tensor))):
            full = self.full_in_features
            if kind == "weight" and (len(tensor.shape) != 2 or tensor.shape[1] != full):
                raise ValueError(f"weight: expected {full} input columns, got {tuple(tensor.shape)}")
            tensor = fp8_shard(tensor, kind, 1, *self.input_range, full)
            return Fp8Linear.weight_loader(self, tensor, kind, shard_id)
        super().weight_loader(tensor, kind, shard_id)
