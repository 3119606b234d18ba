"""The tensor-parallel collectives (layers/distributed.py, engine/parallel.py's step broadcast) between real
processes over gloo, 2 and 4 ranks: sums bit-identical on every rank (the ranks must not drift apart) and equal to a
float32 sum rounded once; the logits gather with uneven parts; steps in one message and larger than one."""

from __future__ import annotations

import datetime
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, out) -> None:
    from hearth.engine.parallel import broadcast_step, init_step_group
    from hearth.layers.context import Context
    from hearth.layers.distributed import all_reduce, gather_last_dim, get_tensor_parallel, set_tensor_parallel

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timeout)
    init_step_group(rank, timeout)
    set_tensor_parallel(rank, size)
    gen = torch.Generator().manual_seed(1 + rank)
    result = {}
    # sums: float32 (a decode step's and a prefill's sizes), bf16 (summed in float32, rounded once), int64
    for name, x in (("f32", torch.randn(3, 576, generator=gen)), ("big", torch.randn(300, 576, generator=gen)),
                    ("bf16", torch.randn(2, 64, generator=gen).to(torch.bfloat16)),
                    ("i64", torch.arange(10) * (rank + 1))):  # fmt: skip
        result[name] = (x.clone(), all_reduce(x))
    # a strided view is summed in place too
    base = torch.randn(4, 8, generator=gen)
    all_reduce(base[:, ::2])
    result["strided"] = base
    parts = [5 + r for r in range(size)]
    result["gather"] = gather_last_dim(torch.full((2, parts[rank]), float(rank)), parts)
    ctx = Context(q_starts=[0, 1], slot_mapping=torch.arange(5), block_tables=torch.ones(2, 3, dtype=torch.long))
    big = torch.arange(50_000)  # 400 KB: past the step's first message (STEP_MESSAGE_BYTES)
    for step in ((torch.tensor([7]), [0], ctx), (big, None), None):
        result.setdefault("steps", []).append(broadcast_step(step if rank == 0 else None))
    result["collective_s"] = get_tensor_parallel().collective_s
    out.put((rank, pickle.dumps(result)))  # by value: the process exits before the parent reads
    dist.destroy_process_group()


def run_ranks(size: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, out)) for r in range(size)]
    for p in procs:
        p.start()
    results = {r: pickle.loads(b) for r, b in (out.get(timeout=120) for _ in range(size))}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("size", [2, 4])
def test_collectives_between_processes(size):
    res = run_ranks(size)
    for name in ("f32", "big", "bf16", "i64"):
        inputs = [res[r][name][0] for r in range(size)]
        want = torch.stack([x.float() if x.is_floating_point() else x for x in inputs]).sum(0).to(inputs[0].dtype)
        for r in range(size):
            got = res[r][name][1]
            assert got.dtype == inputs[0].dtype
            assert torch.equal(got, res[0][name][1]), (name, r)  # bit-identical on every rank
            if name == "i64":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-6 if name != "bf16" else 0, atol=1e-5 if name != "bf16" else 0)
    # the strided view: its columns summed, the others untouched
    for r in range(size):
        assert torch.equal(res[r]["strided"][:, ::2], res[0]["strided"][:, ::2])
    assert not torch.equal(res[0]["strided"][:, 1::2], res[1]["strided"][:, 1::2])
    # the gather: rank 0 gets the parts in rank order, the others None
    assert torch.equal(res[0]["gather"], torch.cat([torch.full((2, 5 + r), float(r)) for r in range(size)], -1))
    assert all(res[r]["gather"] is None for r in range(1, size))
    # the steps arrive whole on every rank, the last one (None: stop) too
    for r in range(1, size):
        (ids, rows, ctx), (big, nothing), stop = res[r]["steps"]
        assert torch.equal(ids, torch.tensor([7])) and rows == [0] and nothing is None and stop is None
        assert torch.equal(ctx.slot_mapping, torch.arange(5)) and torch.equal(
            ctx.block_tables, torch.ones(2, 3, dtype=torch.long)
        )
        assert torch.equal(big, torch.arange(50_000))
    assert all(res[r]["collective_s"] > 0 for r in range(size))
