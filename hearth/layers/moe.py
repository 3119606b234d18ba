"""Mixture of experts: routing as pure functions, a reference per-expert loop, and the grouped fast path.

Experts are given as `expert_fn(expert_id, x [n, hidden]) -> [n, hidden]`, so any expert form (dense, MXFP4, fp8,
with or without biases) plugs in. Both paths compute `out[t] = Σ_j weights[t, j] · expert_fn(ids[t, j], x[t])`;
`grouped_moe` hands all experts' rows to one function (a kernel that runs them in one call). `BlocksMoE` runs a
step's SwiGLU experts held as GGUF blocks (routed ones and shared ones alike) in one C call with int8 activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hearth.kernels import elementwise_cpu, gguf_cpu
from hearth.layers.distributed import get_tensor_parallel

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
GroupedExpertFn = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


SCORING_FUNCS = ("sigmoid", "softmax")


def grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                 topk_group: int, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DeepSeek MoE routing, in float32. Returns (weights, expert ids), both [T, top_k].

    Scores are the router logits through `scoring_func`: each expert's sigmoid (V3, noaux_tc) or a softmax over the
    experts (V2). The correction bias (V3; V2 has none, so zeros) only ranks. With groups, only experts of the
    `topk_group` best groups can be chosen: under sigmoid a group scores the sum of its top-2 biased scores (V3);
    under softmax its best score (V2's group_limited_greedy, as HF's DeepseekV2 router does; llama.cpp takes the
    top-2 sum there too). The weights are the unbiased scores, normalised if `norm_topk_prob`, times the scaling factor.
    One C call on CPU float32 logits (elementwise_cpu.grouped_topk), else the same steps in torch.
    """
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func {scoring_func!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
    args = (top_k, num_groups, topk_group, norm_topk_prob, routed_scaling_factor, scoring_func)
    if elementwise_cpu.can_grouped_topk(router_logits, correction_bias):
        routed = elementwise_cpu.grouped_topk(router_logits, correction_bias, *args)
        if routed is not None:
            return routed
    return elementwise_cpu.grouped_topk_ref(router_logits, correction_bias, *args)


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: top-k logits first, then softmax over those k only. Returns (weights, expert ids), [T, k]."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), ids


def moe_ref(hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Reference: for each expert hit, gather its tokens, run it, add the weighted output (HF's loop)."""
    out = torch.zeros_like(hidden_states)
    for expert_id in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == expert_id)
        y = expert_fn(expert_id, hidden_states[token_idx])
        out.index_add_(0, token_idx, (y * weights[token_idx, slot, None]).to(out.dtype))
    return out


def group_by_expert(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Sort the (token, expert) pairs of ids [T, k] by expert, one host sync for the counts. Returns the sort order
    (into ids.reshape(-1)), each sorted pair's token, and the experts hit with their pair counts, in order."""
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=int(flat_ids.max()) + 1 if flat_ids.numel() else 1).tolist()
    hit = [(expert_id, count) for expert_id, count in enumerate(counts) if count]
    return order, order // top_k, [e for e, _ in hit], [c for _, c in hit]


def fused_moe(hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Grouped path: one sort of the (token, expert) pairs by expert, each expert runs once on a contiguous slice,
    then one weighted scatter-add."""
    order, token_idx, expert_ids, counts = group_by_expert(ids)
    x = hidden_states[token_idx]  # [T*k, hidden], grouped by expert
    ys = torch.empty_like(x)
    start = 0
    for expert_id, count in zip(expert_ids, counts):
        ys[start : start + count] = expert_fn(expert_id, x[start : start + count])
        start += count
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, token_idx, ys)


def grouped_moe(hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                experts_fn: GroupedExpertFn) -> torch.Tensor:  # fmt: skip
    """As fused_moe, but all experts in one call: `experts_fn(x, expert_ids, counts)` gets the rows grouped by
    expert (counts[i] rows for expert_ids[i]) and returns their outputs, e.g. float32. Sums in that dtype."""
    order, token_idx, expert_ids, counts = group_by_expert(ids)
    ys = experts_fn(hidden_states[token_idx], expert_ids, counts)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    out = torch.zeros(hidden_states.shape, dtype=ys.dtype)
    return out.index_add_(0, token_idx, ys).to(hidden_states.dtype)


class BlocksMoE:
    """SwiGLU experts whose fused gate/up and down Linears hold GGUF blocks in the C kernels' form, run together by
    `gguf_cpu.moe`: the routed experts chosen for each token, plus every shared expert at weight 1, in one call that
    reads each hit expert's packed blocks once for all its tokens, with int8 activations (llama.cpp's arithmetic).
    A decode step is bound by the bytes it reads: about one per weight here, against five for dequantizing to bf16
    and a dense matmul. A prefill gives each routed expert a few dozen rows, too few for the dequantization to pay.
    Each token's result does not depend on the others in the step (prefill and decode compute a token alike).
    `build` returns None where that does not apply (another weight form, no C kernels, a tensor-parallel group);
    the caller then keeps its own path."""

    MAX_TOKENS = 512  # tokens per kernel call: its scratch grows with tokens x slots

    def __init__(self, experts: gguf_cpu.R16Experts, num_routed: int):
        self.experts, self.num_routed = experts, num_routed
        self._shared_ids = torch.arange(num_routed, experts.num_experts)

    @classmethod
    def build(cls, routed: list[nn.Module], shared: list[nn.Module] = ()) -> BlocksMoE | None:
        """`routed` and `shared`: modules with `gate_up_proj` (gate rows first) and `down_proj` Linears."""
        if not gguf_cpu.available() or get_tensor_parallel().size != 1:
            return None
        mlps = [*routed, *shared]
        gate_up = [getattr(m.gate_up_proj, "blocks", None) for m in mlps]
        down = [getattr(m.down_proj, "blocks", None) for m in mlps]
        if any(w is None for w in gate_up + down) or any(getattr(m.gate_up_proj, "has_bias", False) for m in mlps):
            return None
        return cls(gguf_cpu.R16Experts(gate_up, down), len(routed))

    def __call__(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], routing weights and expert ids [T, k] -> [T, H] in hidden_states' dtype."""
        num_tokens = hidden_states.shape[0]
        if num_tokens > self.MAX_TOKENS:
            return torch.cat([self(hidden_states[a : a + self.MAX_TOKENS], weights[a : a + self.MAX_TOKENS],
                                   ids[a : a + self.MAX_TOKENS]) for a in range(0, num_tokens, self.MAX_TOKENS)])  # fmt: skip
        num_shared = len(self._shared_ids)
        if num_shared:
            ids = torch.cat([ids, self._shared_ids.expand(num_tokens, num_shared)], dim=1)
            weights = torch.cat([weights.float(), weights.new_ones(num_tokens, num_shared, dtype=torch.float32)], dim=1)
        out_dtype = torch.bfloat16 if hidden_states.dtype == torch.bfloat16 else torch.float32
        return gguf_cpu.moe(hidden_states, self.experts, ids, weights, out_dtype).to(hidden_states.dtype)
