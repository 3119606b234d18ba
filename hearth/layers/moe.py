"""Mixture of experts: routing as pure functions, a reference per-expert loop, and the grouped fast path.

Experts are given as `expert_fn(expert_id, x [n, hidden]) -> [n, hidden]`, so any expert form (dense, MXFP4, fp8,
with or without biases) plugs in. Both paths compute `out[t] = Σ_j weights[t, j] · expert_fn(ids[t, j], x[t])`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: top-k logits first, then softmax over those k only. Returns (weights, expert ids), [T, k]."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), ids


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool = False):
    """Mixtral/Qwen-MoE routing: softmax over all experts, keep the top k (optionally renormalised to sum to 1)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_ref(hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Reference: for each expert hit, gather its tokens, run it, add the weighted output (HF's loop)."""
    out = torch.zeros_like(hidden_states)
    for expert_id in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == expert_id)
        y = expert_fn(expert_id, hidden_states[token_idx])
        out.index_add_(0, token_idx, (y * weights[token_idx, slot, None]).to(out.dtype))
    return out


def fused_moe(hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Grouped path: one sort of the (token, expert) pairs by expert, one host sync for the counts, each expert runs
    once on a contiguous slice, then one weighted scatter-add."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_idx = order // top_k
    counts = torch.bincount(flat_ids, minlength=int(flat_ids.max()) + 1 if flat_ids.numel() else 1).tolist()
    x = hidden_states[token_idx]  # [T*k, hidden], grouped by expert
    ys = torch.empty_like(x)
    start = 0
    for expert_id, count in enumerate(counts):
        if count:
            ys[start : start + count] = expert_fn(expert_id, x[start : start + count])
            start += count
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, token_idx, ys)
