"""MoE experts whose weights may be MXFP4: the layer picks the kernel for the form the weights load in.

Packed MXFP4 stays packed (its dequantization is exact). bf16 runs with the C kernels repack it at load for
kernels/mxfp4_cpu's int8-activation grouped kernel; otherwise each expert runs through quant/mxfp4's matmul, and dense
checkpoints through F.linear. `expert_ref` is the dequantize-then-matmul reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hearth.kernels import mxfp4_cpu
from hearth.kernels.mxfp4_cpu import R16Mxfp4
from hearth.layers.distributed import all_reduce, get_tensor_parallel, split_range
from hearth.layers.moe import fused_moe, grouped_moe, moe_ref
from hearth.quant import mxfp4
from hearth.quant.gguf_types import QuantizedTensor
from hearth.quant.mxfp4 import Mxfp4Weight

Activation = Callable[[torch.Tensor], torch.Tensor]


class Mxfp4Experts(nn.Module):
    """All experts of one MoE layer: gate_up [E, 2I, H] (interleaved gate/up rows) and down [E, H, I], as `(out, in)`,
    each either dense in the compute dtype or packed MXFP4, plus float biases. MXFP4 is held as `Mxfp4Weight` (HF
    layout; float32 runs, or no C compiler) or, for bf16 runs with the C kernels, repacked at load as `R16Mxfp4` (the
    same bits), which runs every expert hit in one int8-activation kernel call per projection. `activation` maps the
    gate_up output [.., 2I] to [.., I] (the model's gated activation).

    Checkpoint layouts: HF MXFP4 (`{name}_blocks` / `{name}_scales`), HF dense (`{name}` as (E, in, out)) and GGUF's
    split gate / up (`gate_proj_weight`, `up_proj_weight`, `down_proj_weight` as (E, out, in), MXFP4 or other types),
    with biases `{name}_bias` or GGUF's `gate_proj_bias` / `up_proj_bias`.

    Under tensor parallelism with expert parallel (layers/distributed.py) a rank keeps experts
    [expert_start, expert_end) whole, runs the (token, expert) pairs routed to them and one all-reduce sums the ranks'
    outputs; a split of each expert's matrices is not implemented, so tensor parallelism without it is refused."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: Activation,
                 swiglu_oss: tuple[float, float] | None = None):  # fmt: skip
        super().__init__()
        tp = get_tensor_parallel()
        if tp.size > 1 and not tp.expert_parallel:
            raise ValueError("MoE experts under tensor parallelism need expert parallel (--enable-expert-parallel)")
        self.ep_size = tp.size
        self.expert_start, self.expert_end = split_range(num_experts, tp.rank, tp.size)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        # (alpha, limit) when `activation` is gpt-oss's clamped SwiGLU: repacked experts then run in one C call
        # (mxfp4_cpu.moe), routing to output, instead of two kernel calls and the torch steps between them
        self.swiglu_oss = swiglu_oss
        self._parts: dict[str, torch.Tensor | QuantizedTensor] = {}
        self.gate_up: torch.Tensor | Mxfp4Weight | R16Mxfp4 | None = None
        self.down: torch.Tensor | Mxfp4Weight | R16Mxfp4 | None = None
        self.gate_up_bias: torch.Tensor | None = None
        self.down_bias: torch.Tensor | None = None
        self.use_reference = False  # route through moe_ref (tests)
        self._cached: tuple[R16Mxfp4, R16Mxfp4] | None = None  # repacked weights from the loader's cache
        self.from_cache = False

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        self._parts[kind] = tensor

    @property
    def nbytes(self) -> int:
        total = 0
        for w in (self.gate_up, self.down, self.gate_up_bias, self.down_bias):
            total += w.nbytes if isinstance(w, (Mxfp4Weight, R16Mxfp4)) else w.numel() * w.element_size()
        return total

    def _weight(self, name: str, out_features: int, in_features: int) -> torch.Tensor | Mxfp4Weight:
        """One projection as (E, out, in) from whichever layout the checkpoint has."""
        parts, shape = self._parts, (self.num_experts, out_features, in_features)
        if f"{name}_blocks" in parts:  # HF / original MXFP4
            w = Mxfp4Weight(parts.pop(f"{name}_blocks").contiguous(), parts.pop(f"{name}_scales").contiguous())
        elif name in parts:  # HF dense: (E, in, out)
            w = parts.pop(name).transpose(1, 2)
        elif name == "gate_up_proj" and "gate_proj_weight" in parts:  # GGUF: split gate / up, (E, out, in)
            gate, up = self._gguf(parts.pop("gate_proj_weight")), self._gguf(parts.pop("up_proj_weight"))
            if isinstance(gate, Mxfp4Weight) and isinstance(up, Mxfp4Weight):
                blocks = torch.stack([gate.blocks, up.blocks], dim=2).flatten(1, 2)
                w = Mxfp4Weight(blocks.contiguous(), torch.stack([gate.scales, up.scales], dim=2).flatten(1, 2))
            else:
                w = torch.stack([_dense(gate), _dense(up)], dim=2).flatten(1, 2)
        elif name == "down_proj" and "down_proj_weight" in parts:
            w = self._gguf(parts.pop("down_proj_weight"))
        else:
            raise ValueError(f"missing {name}")
        if tuple(w.shape) != shape:
            raise ValueError(f"{name}: expected (experts, out, in) = {shape}, got {tuple(w.shape)}")
        return w

    def _repack_gguf(self, dtype: torch.dtype) -> tuple[R16Mxfp4, R16Mxfp4] | None:
        """GGUF's MXFP4 gate, up and down straight from the file's bytes into the int8-activation kernel's form (one
        pass each, this rank's experts only), for bf16 runs with the C kernels; None when that does not apply. With
        weights from the loader's repack cache (`use_repacked`) the file's bytes are not read at all."""
        names = ("gate_proj_weight", "up_proj_weight", "down_proj_weight")
        parts = [self._parts.get(name) for name in names]
        if dtype != torch.bfloat16 or not mxfp4_cpu.available():
            return None
        if not all(isinstance(t, QuantizedTensor) and t.type_name == "MXFP4" and t.shape[0] == self.num_experts
                   for t in parts):  # fmt: skip
            return None
        inter, hidden = self.intermediate_size, self.hidden_size
        for name, t, shape in zip(names, parts, ((inter, hidden), (inter, hidden), (hidden, inter))):
            if tuple(t.shape[1:]) != shape:
                raise ValueError(f"{name}: expected (experts, out, in) = {(self.num_experts, *shape)}, got {t.shape}")
        for name in names:
            del self._parts[name]
        cached, self._cached = self._cached, None
        self.from_cache = cached is not None
        if cached is not None:
            return cached
        a, b = self.expert_start, self.expert_end
        gate, up, down = (t.data.view(self.num_experts, -1)[a:b] for t in parts)
        return mxfp4_cpu.repack_gguf([gate, up], 2 * inter, hidden), mxfp4_cpu.repack_gguf([down], hidden, inter)

    def repacked_state(self) -> dict[str, torch.Tensor]:
        """After `finalize`: the weights it repacked at load (for the loader's repack cache), else {}."""
        if not (isinstance(self.gate_up, R16Mxfp4) and isinstance(self.down, R16Mxfp4)):
            return {}
        return {"gate_up.qs": self.gate_up.qs, "gate_up.sc": self.gate_up.sc, "down.qs": self.down.qs,
                "down.sc": self.down.sc}  # fmt: skip

    def use_repacked(self, state: dict[str, torch.Tensor]) -> bool:
        """Before `finalize`: take `repacked_state()`'s tensors from an earlier load (views of the cache) instead of
        repacking, if they have exactly the shapes this layer's repack would make; False (and nothing taken) if not.
        `finalize` uses them only where it would repack GGUF MXFP4 itself."""
        inter, hidden, experts = self.intermediate_size, self.hidden_size, self.expert_end - self.expert_start
        weights = []
        for name, n, k in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)):
            qs, sc = state.get(f"{name}.qs"), state.get(f"{name}.sc")
            groups = (experts, -(-n // 16), k // 32)
            if qs is None or sc is None or qs.dtype != torch.uint8 or sc.dtype != torch.uint8:
                return False
            if tuple(qs.shape) != (*groups, 256) or tuple(sc.shape) != (*groups, 16) or k % 32:
                return False
            weights.append(R16Mxfp4(qs, sc, n, k))
        self._cached = (weights[0], weights[1])
        return True

    @staticmethod
    def _gguf(t):
        if isinstance(t, QuantizedTensor) and t.type_name == "MXFP4":
            return mxfp4.from_gguf(t.data, tuple(t.shape))
        return t

    def _bias(self, name: str) -> torch.Tensor:
        parts = self._parts
        if f"{name}_bias" in parts:
            return _dense(parts.pop(f"{name}_bias"))
        if name == "gate_up_proj" and "gate_proj_bias" in parts:
            gate, up = _dense(parts.pop("gate_proj_bias")), _dense(parts.pop("up_proj_bias"))
            return torch.stack([gate, up], dim=-1).flatten(-2)
        raise ValueError(f"missing {name}_bias")

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        """MXFP4 stays packed whatever `keep_quantized` says: its dequantization is exact, so float32 runs lose nothing.
        With bf16 and the C kernels it is repacked for the int8-activation kernel (`R16Mxfp4`)."""
        inter, hidden = self.intermediate_size, self.hidden_size
        repacked = self._repack_gguf(dtype)
        if repacked is not None:
            gate_up, down = repacked
        else:
            gate_up = self._weight("gate_up_proj", 2 * inter, hidden)
            down = self._weight("down_proj", hidden, inter)
        self.gate_up_bias = self._bias("gate_up_proj").to(dtype).contiguous()
        self.down_bias = self._bias("down_proj").to(dtype).contiguous()
        if self._parts:
            raise ValueError(f"unexpected expert tensors {sorted(self._parts)}")
        if self.ep_size > 1:  # this rank's experts only, copied out of the checkpoint's
            a, b = self.expert_start, self.expert_end
            if repacked is None:
                gate_up, down = _experts(gate_up, a, b), _experts(down, a, b)
            self.gate_up_bias, self.down_bias = self.gate_up_bias[a:b].clone(), self.down_bias[a:b].clone()
        if repacked is not None:  # already this rank's experts, in the kernel's form
            self.gate_up, self.down = gate_up, down
            return
        self.gate_up = gate_up if isinstance(gate_up, Mxfp4Weight) else _dense(gate_up).to(dtype).contiguous()
        self.down = down if isinstance(down, Mxfp4Weight) else _dense(down).to(dtype).contiguous()
        packed = isinstance(gate_up, Mxfp4Weight) and isinstance(down, Mxfp4Weight)
        if packed and dtype == torch.bfloat16 and mxfp4_cpu.available():  # the int8-activation kernel's form
            self.gate_up = mxfp4_cpu.repack(gate_up.blocks, gate_up.scales)
            self.down = mxfp4_cpu.repack(down.blocks, down.scales)

    def _linear(self, w, bias: torch.Tensor, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        w = _unpack(w[expert_id]) if isinstance(w, R16Mxfp4) else w[expert_id]
        if isinstance(w, Mxfp4Weight):
            return mxfp4.mxfp4_matmul(x, w.blocks, w.scales, bias[expert_id])
        return F.linear(x, w, bias[expert_id])

    def expert(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        h = self._linear(self.gate_up, self.gate_up_bias, expert_id, x)
        return self._linear(self.down, self.down_bias, expert_id, self.activation(h))

    def expert_ref(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        """Same expert through dequantize-then-matmul (mxfp4_matmul_ref)."""

        def linear(w, bias, x):
            w = _unpack(w[expert_id]) if isinstance(w, R16Mxfp4) else w[expert_id]
            if isinstance(w, Mxfp4Weight):
                return mxfp4.mxfp4_matmul_ref(x, w.blocks, w.scales, bias[expert_id])
            return F.linear(x, w, bias[expert_id])

        h = linear(self.gate_up, self.gate_up_bias, x)
        return linear(self.down, self.down_bias, self.activation(h))

    def experts_q8(self, x: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Rows grouped by expert through both repacked projections (int8 activations, float32 in between)."""
        rows = torch.repeat_interleave(torch.tensor(expert_ids), torch.tensor(counts))  # each row's expert
        h = mxfp4_cpu.moe_q8(x, self.gate_up, expert_ids, counts) + self.gate_up_bias[rows].float()
        h = self.activation(h)
        return mxfp4_cpu.moe_q8(h, self.down, expert_ids, counts) + self.down_bias[rows].float()

    def forward(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.ep_size > 1:
            return self._forward_expert_parallel(hidden_states, weights, ids)
        return self._forward(hidden_states, weights, ids)

    def _forward_expert_parallel(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """The pairs routed to this rank's experts, one per row, summed per token, then over the ranks."""
        flat = ids.reshape(-1)
        pairs = ((flat >= self.expert_start) & (flat < self.expert_end)).nonzero().squeeze(1)
        token = pairs // ids.shape[1]
        out = torch.zeros_like(hidden_states)
        if pairs.numel():
            local = self._forward(hidden_states[token], weights.reshape(-1)[pairs, None],
                                  (flat[pairs] - self.expert_start)[:, None])  # fmt: skip
            out.index_add_(0, token, local.to(out.dtype))
        return all_reduce(out)

    def _forward(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return moe_ref(hidden_states, weights, ids, self.expert_ref)
        if isinstance(self.gate_up, R16Mxfp4) and isinstance(self.down, R16Mxfp4):
            if self.swiglu_oss is not None:
                out_dtype = torch.bfloat16 if hidden_states.dtype == torch.bfloat16 else torch.float32
                out = mxfp4_cpu.moe(hidden_states, self.gate_up, self.gate_up_bias, self.down, self.down_bias, ids,
                                    weights, *self.swiglu_oss, dtype=out_dtype)  # fmt: skip
                if out is not None:
                    return out.to(hidden_states.dtype)
            return grouped_moe(hidden_states, weights, ids, self.experts_q8)
        return fused_moe(hidden_states, weights, ids, self.expert)


def _experts(w, a: int, b: int):
    """Experts a:b of stacked (E, out, in) weights, dense or MXFP4, copied."""
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.blocks[a:b].clone(), w.scales[a:b].clone())
    return _dense(w)[a:b].clone()


def _unpack(w: R16Mxfp4) -> Mxfp4Weight:
    return Mxfp4Weight(*mxfp4_cpu.unpack(w))


def _dense(t) -> torch.Tensor:
    if isinstance(t, R16Mxfp4):
        t = _unpack(t)
    return t.dequantize() if isinstance(t, (QuantizedTensor, Mxfp4Weight)) else t
