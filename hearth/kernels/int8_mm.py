"""Weight-only int8 matmul (one scale per output row) through PyTorch's CPU kernel, with a plain-torch reference.

Used for GGUF types that have no exact int4 form (Q8_0, Q5_*, Q6_K, …): their weights are requantized once at load
to symmetric per-row int8. The kernel wants bf16 activations.
"""

from __future__ import annotations

import torch


def quantize_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scales [N]) with w ≈ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: [M, K], q: [N, K] int8, scales: [N] bf16 -> [M, N]
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)


def int8_mm_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize, then matmul, in float32."""
    return (x.float() @ (q.float() * scales.float()[:, None]).t()).to(x.dtype)
