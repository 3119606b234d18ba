"""The tensor-parallel group this process belongs to, and the few collectives the parallel layers need.

The engine sets the rank and size (`set_tensor_parallel`) before it builds the model; the layers read them when they
are built, so a model declares parallel layers and never handles ranks itself. Size 1 (the default) runs no
collective at all. The transport is torch.distributed's default process group (gloo on CPU, nccl on CUDA).

Why the sums and the logits gather are built from point-to-point calls on gloo: a decode step sums one hidden vector
(a few KiB) twice per layer, so what counts is each collective's latency, not its bandwidth. Between two 1-thread
processes on a 2-core machine, with 576 floats, the c10d calls measured (median microseconds; a quiet machine, then
one loaded by other work): `all_reduce` 343-1745 / 435, `all_gather` 690 / 315, `broadcast` 138-227 / 188, a
blocking ping-pong (the lower rank sends then receives, the other receives then sends) 125-149 / 265, and an
exchange where both ranks post `irecv` and then send 104-346 / 2032 (on a loaded machine the simultaneous exchange
fares worst; in the ping-pong the receiver is already waiting when the data comes). gloo's all_reduce runs a general
algorithm with several rounds even for two ranks; one ping-pong per pair is the least a sum can cost here.

So, on gloo with CPU tensors:
- a sum over a power-of-two group is recursive doubling: at step s each rank swaps its running sum with rank
  `rank ^ 2**s` (a ping-pong) and adds. IEEE addition is commutative, so both ranks of a pair compute the same
  bits, and every rank ends with the identical ((x0 + x1) + (x2 + x3)) ... tree: the ranks never drift apart. Past
  `P2P_MAX_BYTES` (a prefill's large sums) with more than two ranks, gloo's own all_reduce moves fewer bytes per
  rank and is used; for two ranks a swap moves exactly what a ring would;
- the logits gather is one send per rank to rank 0 (no padding to a common width);
- other group sizes, and NCCL (whose kernels are built for this), use dist.all_reduce and dist.gather.
Half-precision tensors on CPU are summed in float32 and rounded once, as one whole matmul rounds its sum once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hearth.config import head_partition, split_range  # noqa: F401 (the layers' split rules, shared with the planner)

# above this many bytes, a group of more than two ranks sums with dist.all_reduce (bandwidth-bound: ring algorithms)
P2P_MAX_BYTES = 1 << 18


@dataclass(slots=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # MoE layers split their experts over the ranks (E/size each) instead of failing
    # seconds spent in collectives since the last reset (benchmarks read it)
    collective_s: float = 0.0
    # the default group's backend is gloo and the size a power of two: sums by point-to-point exchanges (None: unknown)
    p2p: bool | None = None


_TP = TensorParallel()


def get_tensor_parallel() -> TensorParallel:
    return _TP


def set_tensor_parallel(rank: int, size: int, expert_parallel: bool = False) -> None:
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a group of {size}")
    _TP.rank, _TP.size, _TP.expert_parallel, _TP.collective_s, _TP.p2p = rank, size, expert_parallel, 0.0, None


def _point_to_point(x: torch.Tensor) -> bool:
    """Whether `x` goes by exchanges (gloo, CPU, a power-of-two group; small enough when more than two ranks)."""
    if _TP.p2p is None:
        _TP.p2p = dist.get_backend() == "gloo" and _TP.size & (_TP.size - 1) == 0
    return _TP.p2p and x.device.type == "cpu" and (_TP.size == 2 or x.numel() * x.element_size() <= P2P_MAX_BYTES)


def exchange_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum the contiguous `x` over a power-of-two group by recursive doubling, in place; bit-identical on every
    rank (module docstring)."""
    other = torch.empty_like(x)
    step = 1
    while step < _TP.size:
        peer = _TP.rank ^ step
        if _TP.rank < peer:  # a ping-pong: the lower rank sends first, the higher one is already waiting for it
            dist.send(x, peer)
            dist.recv(other, peer)
        else:
            dist.recv(other, peer)
            dist.send(x, peer)
        x.add_(other)
        step <<= 1
    return x


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the group, in place (one collective); the identity at size 1."""
    if _TP.size == 1:
        return x
    start = time.perf_counter()
    # gloo sums half-precision tensors in their own precision, pairwise: sum in float32, round once
    wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" else x
    wide = wide.contiguous()
    if _point_to_point(wide):
        exchange_sum_(wide)
    else:
        dist.all_reduce(wide)
    if wide is not x:
        x.copy_(wide)
    _TP.collective_s += time.perf_counter() - start
    return x


def gather_last_dim(x: torch.Tensor, part_sizes: list[int]) -> torch.Tensor | None:
    """Rank 0: the ranks' parts of `x` joined along the last dimension (rank r's part has part_sizes[r] columns);
    other ranks: None."""
    if _TP.size == 1:
        return x
    start = time.perf_counter()
    local = x.contiguous()
    if _point_to_point(local):
        if _TP.rank != 0:
            dist.send(local, 0)
            parts = None
        else:
            parts = [local] + [local.new_empty(*local.shape[:-1], n) for n in part_sizes[1:]]
            for work in [dist.irecv(p, r) for r, p in enumerate(parts) if r > 0]:
                work.wait()
    else:  # dist.gather wants one shape: parts padded to the widest
        width = max(part_sizes)
        local = local if local.shape[-1] == width else torch.nn.functional.pad(local, (0, width - local.shape[-1]))
        padded = [torch.empty_like(local) for _ in range(_TP.size)] if _TP.rank == 0 else None
        dist.gather(local.contiguous(), padded, dst=0)
        parts = None if padded is None else [p[..., :n] for p, n in zip(padded, part_sizes)]
    _TP.collective_s += time.perf_counter() - start
    if parts is None:
        return None
    return torch.cat(parts, dim=-1)
