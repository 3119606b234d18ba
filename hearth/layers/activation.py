"""SiluAndMul: the SwiGLU gate on a fused [gate | up] projection."""

import torch
import torch.nn.functional as F
from torch import nn

from hearth.kernels import elementwise_cpu


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if elementwise_cpu.can_silu_and_mul(x):  # bf16 rows on CPU: torch's arithmetic in one C pass
            return elementwise_cpu.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
