"""The tensor-parallel group this process belongs to, and the few collectives the parallel layers need.

The engine sets the rank and size (`set_tensor_parallel`) before it builds the model; the layers read them when they
are built, so a model declares parallel layers and never handles ranks itself. Size 1 (the default) runs no
collective at all. The transport is torch.distributed's default process group (gloo on CPU, nccl on CUDA).

The sums and the gather are torch.distributed's own collectives, on purpose: a decode step sums one hidden vector
(a few KiB) twice per layer, so each call's latency is what counts, and on gloo between two CPU processes
dist.all_reduce measured the cheapest way to sum such a vector, against an all-gather or two broadcasts followed by a
sum in rank order, and against point-to-point swaps (gloo's send/recv stall for milliseconds every few calls: their
mean over many calls was about seven times all_reduce's). Half-precision tensors on CPU are summed in float32 and
rounded once, as one whole matmul rounds its sum once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hearth.config import head_partition, split_range  # noqa: F401 (the layers' split rules, shared with the planner)


@dataclass(slots=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # MoE layers split their experts over the ranks (E/size each) instead of failing
    # seconds spent in collectives since the last reset (benchmarks read it)
    collective_s: float = 0.0


_TP = TensorParallel()


def get_tensor_parallel() -> TensorParallel:
    return _TP


def set_tensor_parallel(rank: int, size: int, expert_parallel: bool = False) -> None:
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a group of {size}")
    _TP.rank, _TP.size, _TP.expert_parallel, _TP.collective_s = rank, size, expert_parallel, 0.0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the group, in place (one collective); the identity at size 1."""
    if _TP.size == 1:
        return x
    start = time.perf_counter()
    # gloo sums half-precision tensors in their own precision, pairwise: sum in float32, round once. A view that is
    # not contiguous is summed through a contiguous copy (the collective reads and writes flat memory)
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" else x
    wide = wide.contiguous()
    dist.all_reduce(wide)
    if wide is not x:
        x.copy_(wide)
    _TP.collective_s += time.perf_counter() - start
    return x


def gather_last_dim(x: torch.Tensor, part_sizes: list[int]) -> torch.Tensor | None:
    """Rank 0: the ranks' parts of `x` joined along the last dimension (rank r's part has part_sizes[r] columns);
    other ranks: None. Parts are padded to the largest for the collective."""
    if _TP.size == 1:
        return x
    width = max(part_sizes)
    local = x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    local = local.contiguous()
    start = time.perf_counter()
    parts = [torch.empty_like(local) for _ in range(_TP.size)] if _TP.rank == 0 else None
    dist.gather(local, parts, dst=0)
    _TP.collective_s += time.perf_counter() - start
    if parts is None:
        return None
    return torch.cat([p[..., :n] for p, n in zip(parts, part_sizes)], dim=-1)
