"""Tensor-parallel processes over torch.distributed: start the ranks, agree on the flags, send each step's batch.

Rank 0 (the process that builds the LLMEngine) owns the scheduler, the block manager and the API. On its machine it
starts the other local ranks as spawned processes; on other machines `hearth serve ... --headless --node-rank R` starts
theirs. Every rank joins one process group (gloo on CPU, nccl on CUDA) at `master_addr:master_port`, checks that all
were started with the same flags (a hash exchanged at start), loads its shard and, on ranks other than 0, runs
`worker_loop`: receive a step (input ids, positions, the forward Context, the rows to sample), run the same forward,
and take part in its collectives. A step travels as one pickle (tensors as numpy arrays: torch's own tensor pickling
costs about 0.4 ms to write and 1.2 ms to read a decode step's few small tensors) in one fixed-size message, plus a
second message only for the part of a large step that does not fit (`STEP_MESSAGE_BYTES`), each one broadcast.
broadcast_object_list would send two messages (the size, then the bytes) every step.

A worker dies with its parent (PR_SET_PDEATHSIG, and a poll of the parent as a fallback), so a rank 0 that is killed
leaves nothing running.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist

from hearth.config import EngineConfig
from hearth.engine.protocol import EngineFatalError
from hearth.layers.distributed import get_tensor_parallel
from hearth.loader.resolve import ModelRef

logger = logging.getLogger(__name__)

_STEP_GROUP = None
# a step's first message: 8 bytes of length, then the pickle (a decode step's is about 1 KiB); the rest of a larger
# one follows in a second message
STEP_MESSAGE_BYTES = 1 << 13

# flags that may differ between nodes (each says where it is); every other EngineConfig field must match
NODE_LOCAL_FIELDS = ("node_rank",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def config_hash(ref: ModelRef, engine_config: EngineConfig) -> str:
    """What every rank must agree on: the model file's name and size, and the engine flags."""
    flags = {k: v for k, v in dataclasses.asdict(engine_config).items() if k not in NODE_LOCAL_FIELDS}
    size = os.path.getsize(ref.path) if os.path.isfile(ref.path) else None
    text = json.dumps([os.path.basename(ref.path.rstrip("/")), size, flags], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ranks_per_node(engine_config: EngineConfig) -> int:
    return engine_config.tensor_parallel_size // engine_config.nnodes


def init_group(rank: int, engine_config: EngineConfig, device: str, ref: ModelRef) -> None:
    """Join the process group as `rank` and refuse a group whose ranks were started with different flags."""
    world = engine_config.tensor_parallel_size
    timeout = datetime.timedelta(seconds=engine_config.distributed_timeout_s)
    addr = f"tcp://{engine_config.master_addr}:{engine_config.master_port}"
    dist.init_process_group(backend_for(device), init_method=addr, rank=rank, world_size=world, timeout=timeout)
    init_step_group(rank, timeout)
    hashes: list = [None] * world
    dist.all_gather_object(hashes, config_hash(ref, engine_config))
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise ValueError(f"tensor-parallel ranks {differ} were started with other flags or another model file than "
                         "rank 0; start every node with the same model and flags")  # fmt: skip


def _tensor_to_numpy(t: torch.Tensor):
    return torch.from_numpy, (t.numpy(),)


def encode_step(step: tuple | None) -> bytes:
    """A step as bytes: a pickle whose CPU tensors are numpy arrays (a tenth of torch's pickling time)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _tensor_to_numpy}
    pickler.dump(step)
    return out.getvalue()


def init_step_group(rank: int, timeout: datetime.timedelta) -> None:
    """The group the steps travel in (after init_process_group). Its timeout is each process's own: rank 0's sends
    time out as the collectives do (a rank hangs), while the other ranks wait for the next step as long as the server
    stays idle."""
    global _STEP_GROUP
    wait = timeout if rank == 0 else datetime.timedelta(days=365)
    _STEP_GROUP = dist.new_group(backend="gloo", timeout=wait)


def broadcast_step(step: tuple | None) -> tuple | None:
    """Rank 0 sends a step (or None: stop) to every rank; the others receive it. Tensors travel on the CPU."""
    start = time.perf_counter()
    first = torch.zeros(STEP_MESSAGE_BYTES, dtype=torch.uint8)
    head = first[:8].view(torch.int64)
    room = STEP_MESSAGE_BYTES - 8
    if dist.get_rank() == 0:
        data = torch.frombuffer(bytearray(encode_step(step)), dtype=torch.uint8)
        head[0] = len(data)
        first[8 : 8 + min(room, len(data))] = data[:room]
        dist.broadcast(first, src=0, group=_STEP_GROUP)
        if len(data) > room:
            dist.broadcast(data[room:].clone(), src=0, group=_STEP_GROUP)
    else:
        dist.broadcast(first, src=0, group=_STEP_GROUP)
        size = int(head[0])
        data = first[8 : 8 + size]
        if size > room:
            rest = torch.empty(size - room, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=_STEP_GROUP)
            data = torch.cat([data, rest])
        step = pickle.loads(data.numpy().tobytes())
    get_tensor_parallel().collective_s += time.perf_counter() - start
    return step


def die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when its parent exits (Linux); elsewhere a thread polls for the parent."""
    with_signal = False
    with contextlib.suppress(OSError, AttributeError):  # not Linux/glibc: poll
        with_signal = ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if with_signal:
        return

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=poll, name="hearth-parent-watch", daemon=True).start()


def worker_main(ref: ModelRef, engine_config: EngineConfig, device: str, rank: int, parent_pid: int | None) -> None:
    """A rank other than 0: join the group, load this rank's shard, run the steps rank 0 sends until it says stop."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops the rest
    from hearth.engine.llm_engine import read_model_config
    from hearth.engine.model_runner import ModelRunner

    init_group(rank, engine_config, device, ref)
    runner = ModelRunner(ref, read_model_config(ref), engine_config, device, rank=rank)
    try:
        runner.worker_loop()
    finally:
        runner.close()


class LocalRanks:
    """The ranks this machine starts besides its own: spawned processes that die with this one."""

    def __init__(self, ref: ModelRef, engine_config: EngineConfig, device: str, first_rank: int):
        per_node = ranks_per_node(engine_config)
        ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.Process] = {}
        for rank in range(first_rank + 1, first_rank + per_node):
            proc = ctx.Process(target=worker_main, args=(ref, engine_config, device, rank, os.getpid()),
                               name=f"hearth-rank{rank}", daemon=True)  # fmt: skip
            proc.start()
            self.procs[rank] = proc

    def dead(self) -> str | None:
        """A one-line account of the first local rank that has exited, or None while all run."""
        for rank, proc in self.procs.items():
            if proc.exitcode is not None:
                return f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
        return None

    def stop(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def fault(error: BaseException, ranks: LocalRanks | None, timeout_s: float) -> EngineFatalError:
    """The engine-stopping error for a collective that failed: it names the rank that exited, or says a rank hung."""
    time.sleep(0.2)  # a rank that died takes a moment to be reaped
    reason = ranks.dead() if ranks is not None else None
    if reason is None:
        reason = (f"a tensor-parallel rank stopped answering (no reply within {timeout_s:g}s, or its node went away: "
                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__})")  # fmt: skip
    return EngineFatalError(reason)


def torchrun_rank() -> int | None:
    """This process's rank when `torchrun` started it (then torchrun starts every rank: none is spawned here)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def torchrun_config(engine_config: EngineConfig) -> EngineConfig:
    """`engine_config` with the group torchrun describes in the environment (WORLD_SIZE, MASTER_ADDR, ...)."""
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return dataclasses.replace(engine_config, tensor_parallel_size=world, nnodes=max(1, world // local),
                               node_rank=int(os.environ.get("GROUP_RANK", 0)), master_addr=os.environ["MASTER_ADDR"],
                               master_port=int(os.environ["MASTER_PORT"]))  # fmt: skip


def run_headless(ref: ModelRef, engine_config: EngineConfig, device: str) -> None:
    """A node other than rank 0's (`hearth serve --headless`), or a torchrun rank other than 0: run this node's
    ranks until rank 0 stops them."""
    rank = torchrun_rank()
    ranks = None
    if rank is None:  # this node's first rank here, the others spawned
        rank = engine_config.node_rank * ranks_per_node(engine_config)
        ranks = LocalRanks(ref, engine_config, device, first_rank=rank)
    try:
        worker_main(ref, engine_config, device, rank, None)
    finally:
        if ranks is not None:
            ranks.stop()
