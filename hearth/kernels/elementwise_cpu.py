"""bf16 elementwise kernels for CPU prefill (elementwise_cpu.c), built by `cbuild.load_library`, called via ctypes.

Between the matmuls of a bf16 prefill, torch runs RMSNorm, SiLU-and-mul and the rotary embedding as chains of
elementwise ops, each reading and writing a whole activation; each kernel here
is one pass. Where the library is not built the `can_*` guards are False and the layers keep their torch code.

- `rms_norm(x, weight, eps, residual)`: F.rms_norm's bf16 arithmetic (normalise and scale in float32, round once), the
  residual add first as torch's bf16 add, written into `residual` in place. Equal to `rms_norm_ref` but for the order
  of the float32 sum of squares: at most one bf16 step apart, and only rarely.
- `silu_and_mul(x)`: torch's bf16 steps (silu rounded to bf16, then the product); the vectorised exp can move silu by
  a few float32 ulps, so bf16(silu) may rarely round the other way (none in 6M random gates): one bf16 step, which
  the product's rounding can carry to two.
- `rotary_(x, cos, sin)`: rotate-half rope in place with bf16 cos/sin rows, in torch's bf16 steps (x * cos
  rounded to bf16, then the other product added with one rounding): bit-for-bit `rotary_ref`, which is the layers'
  `apply_rotary_emb` on bf16 tensors (HF's rope on a bf16 model). (Computing in float32 from float32 tables and
  rounding once is closer to the exact value, but it moved SmolLM2's greedy answer to "What is the capital of
  France?" away from the float32 model's "Paris": the bf16 model stays on the arithmetic it was validated with.)
- `grouped_topk(logits, bias, ...)`: DeepSeek's MoE routing (sigmoid or softmax scores, correction bias, group top-k,
  top-k, normalise, scale) per row in one call instead of about ten torch ops per MoE layer; the same float32 steps as
  `grouped_topk_ref` (the same ids; weights within an ulp of exp's).
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from hearth.kernels.cbuild import Library

SOURCE = os.path.join(os.path.dirname(__file__), "elementwise_cpu.c")


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ew_rms_norm.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_float, ptr, i64, c_int]
    lib.ew_rms_norm.restype = None
    lib.ew_silu_and_mul.argtypes = [i64, i64, ptr, i64, ptr, i64, c_int]
    lib.ew_silu_and_mul.restype = None
    lib.ew_rotary.argtypes = [i64, i64, i64, ptr, i64, i64, ptr, ptr, c_int]
    lib.ew_rotary.restype = None
    lib.ew_vectorized.restype = ctypes.c_int
    lib.ew_grouped_topk.argtypes = [i64, i64, ptr, i64, ptr, i64, i64, i64, c_int, ctypes.c_float, c_int, ptr, ptr,
                                    c_int]  # fmt: skip
    lib.ew_grouped_topk.restype = c_int


_get = Library(SOURCE, "elementwise bf16 kernels", _declare)


def available() -> bool:
    return _get() is not None


def _rows(x: torch.Tensor) -> bool:
    """A bf16 CPU matrix whose rows are contiguous and do not overlap (any row stride from the row length up)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1
            and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1]))  # fmt: skip


def _apart_or_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same tensor or their memory does not overlap (the residual is written in place)."""
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True

    def span(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t.data_ptr() + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a1 <= b0 or b1 <= a0


def can_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """x [M, H] bf16 on CPU with contiguous rows, a bf16 weight [H], a residual like x, and the library built."""
    return (_rows(x) and weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape == x.shape[1:]
            and (residual is None or (_rows(residual) and residual.shape == x.shape and _apart_or_same(x, residual)))
            and available())  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.rms_norm(x (+ residual), weight) -> a new [M, H] bf16; with `residual`, it becomes x + residual in place."""
    m, h = x.shape
    out = torch.empty(m, h, dtype=torch.bfloat16)
    _get().ew_rms_norm(m, h, x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
                       0 if residual is None else residual.stride(0), weight.data_ptr(), eps, out.data_ptr(), h,
                       torch.get_num_threads())  # fmt: skip
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain torch: (normed, x + residual) with a residual (not updated), else normed."""
    if residual is not None:
        x = x + residual
    out = F.rms_norm(x, weight.shape, weight, eps)
    return out if residual is None else (out, x)


def can_silu_and_mul(x: torch.Tensor) -> bool:
    """x [M, 2I] bf16 on CPU with contiguous rows, and the library built."""
    return _rows(x) and x.shape[1] % 2 == 0 and available()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[M, 2I] = [gate | up] -> silu(gate) * up, [M, I] bf16."""
    m, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(m, inter, dtype=torch.bfloat16)
    _get().ew_silu_and_mul(m, inter, x.data_ptr(), x.stride(0), out.data_ptr(), inter, torch.get_num_threads())
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def can_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x [T, heads, D] bf16 on CPU (heads at least D apart, D even, tokens not overlapping: a view of the q or kv
    projection's output, e.g. the rope dims of each head), bf16 contiguous cos/sin [T, D] (the rows of x's
    positions), and the library built."""
    if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1):
        return False
    t, heads, d = x.shape
    tables = all(tab.dtype == torch.bfloat16 and tab.is_contiguous() and tab.shape == (t, d) for tab in (cos, sin))
    heads_apart = heads <= 1 or x.stride(1) >= d
    tokens_apart = t <= 1 or x.stride(0) >= (heads - 1) * x.stride(1) + d
    return tables and d % 2 == 0 and heads_apart and tokens_apart and available()


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] in place by the cos/sin rows [T, D]; returns x."""
    t, heads, d = x.shape
    _get().ew_rotary(t, heads, d, x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                     torch.get_num_threads())  # fmt: skip
    return x


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain torch, not in place: addcmul(x * cos, rotate_half(x), sin) on the bf16 rows (each op rounding to bf16)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.addcmul(x * cos[:, None], torch.cat((-x2, x1), dim=-1), sin[:, None])
    return out.to(x.dtype)


def can_grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor) -> bool:
    """float32 CPU logits [T, E] with contiguous rows, a float32 contiguous bias [E], and the library built."""
    return (router_logits.dtype == correction_bias.dtype == torch.float32 and router_logits.device.type == "cpu"
            and router_logits.dim() == 2 and router_logits.stride(1) == 1 and correction_bias.is_contiguous()
            and correction_bias.shape == router_logits.shape[1:] and available())  # fmt: skip


def grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                 topk_group: int, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """`grouped_topk_ref` in C: (weights float32, ids int64), both [T, top_k]; None where the shape is out of the
    kernel's range (over 1024 experts, groups that do not divide them)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32)
    ids = torch.empty(num_tokens, top_k, dtype=torch.long)
    ok = _get().ew_grouped_topk(num_tokens, num_experts, router_logits.data_ptr(), router_logits.stride(0),
                                correction_bias.data_ptr(), top_k, num_groups, topk_group, int(norm_topk_prob),
                                routed_scaling_factor, int(scoring_func == "softmax"), weights.data_ptr(),
                                ids.data_ptr(), torch.get_num_threads())  # fmt: skip
    return (weights, ids) if ok else None


def grouped_topk_ref(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                 topk_group: int, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 scoring_func: str = "sigmoid"):  # fmt: skip
    """DeepSeek MoE routing in plain torch, float32 (the steps: hearth.layers.moe.grouped_topk). Returns (weights,
    expert ids), both [T, top_k]."""
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    num_tokens, num_experts = scores.shape
    choice = scores + correction_bias.float()
    if topk_group < num_groups:  # otherwise every group is kept (V2-Lite: one group): nothing to mask
        grouped = choice.view(num_tokens, num_groups, -1)
        if scoring_func == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        groups = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(num_experts // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids
