"""Rotary position embeddings: inv_freq with llama3 / linear / YaRN scaling as pure functions, plus a cos/sin cache.

Follows HF transformers' `modeling_rope_utils` (rotate_half convention: element i pairs with i + d/2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hearth.kernels import elementwise_cpu


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(dim: int, base: float, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (NTK-by-parts): returns (inv_freq, attention_factor applied to cos/sin)."""
    factor = scaling["factor"]
    old_len = scaling.get("original_max_position_embeddings") or max_position
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(old_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def compute_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None, max_position: int):
    """(inv_freq, attention_factor) for a rope config."""
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return default_inv_freq(dim, base), 1.0
    if kind == "llama3":
        return llama3_inv_freq(default_inv_freq(dim, base), scaling), 1.0
    if kind == "linear":
        return default_inv_freq(dim, base) / scaling["factor"], 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, base, scaling, max_position)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def deinterleave_pairs(x: torch.Tensor) -> torch.Tensor:
    """The last dim's pairs (2i, 2i+1) as rotate-half's halves (i, i + d/2), in a new contiguous tensor: a rope
    checkpoint written for interleaved pairs (DeepSeek's) rotated by the rotate-half tables."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = torch.addcmul(x * cos, rotate_half(x), sin)  # x*cos + rotate_half(x)*sin in two ops
    return out if out.dtype == x.dtype else out.to(x.dtype)


def apply_rotary_emb_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb written into x (a view of the qkv projection's output) and returned. bf16 x on CPU takes one
    C pass (elementwise_cpu.rotary_: bit-for-bit the same values)."""
    if elementwise_cpu.can_rotary(x, cos, sin):
        return elementwise_cpu.rotary_(x, cos, sin)
    return x.copy_(apply_rotary_emb(x, cos, sin))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_position), computed once in float32."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.max_position = max_position
        self.inv_freq, self.attention_factor = compute_inv_freq(head_dim, base, scaling, max_position)
        self._build(self.inv_freq)

    def _build(self, inv_freq: torch.Tensor) -> None:
        t = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * self.attention_factor, persistent=False)

    def weight_loader(self, tensor: torch.Tensor, kind: str = "freq_factors", shard_id: int = 0) -> None:
        """GGUF `rope_freqs.weight` (Llama 3.x): per-frequency divisors that encode the rope scaling."""
        if kind != "freq_factors" or tuple(tensor.shape) != tuple(self.inv_freq.shape):
            raise ValueError(f"rope {kind}: expected shape {tuple(self.inv_freq.shape)}, got {tuple(tensor.shape)}")
        self._build(self.inv_freq / tensor.float())

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions ([num_tokens, head_dim]); computed once per forward, shared by all layers."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)
