"""Weight-only int8 matmul (one scale per output row) through PyTorch's CPU kernel, with a plain-torch reference.

Used for GGUF types that have no exact int4 form (Q8_0, Q5_*, Q6_K, …): their weights are requantized once at load
to symmetric per-row int8. The kernel wants bf16 activations.
"""

from __future__ import annotations

import torch


def quantize_per_row(w, num_rows: int | None = None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 scales [N]) with w ≈ q * scale.

    `w` may also be a function of a row range returning those rows as float (e.g. dequantizing a GGUF tensor), with
    `num_rows` given: rows are then converted `chunk` at a time, so a large table never exists in float32 whole.
    """
    rows_of = w if callable(w) else (lambda a, b: w[a:b])
    n = num_rows if callable(w) else w.shape[0]
    qs, scales = [], []
    for a in range(0, n, chunk):
        part = rows_of(a, min(a + chunk, n)).float()
        s = (part.abs().amax(dim=1) / 127).clamp(min=1e-12)
        qs.append(torch.round(part / s[:, None]).clamp(-127, 127).to(torch.int8))
        scales.append(s)
    return torch.cat(qs).contiguous(), torch.cat(scales)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: [M, K], q: [N, K] int8, scales: [N] bf16 -> [M, N]
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)


def int8_mm_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize, then matmul, in float32."""
    return (x.float() @ (q.float() * scales.float()[:, None]).t()).to(x.dtype)
