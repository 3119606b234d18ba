"""Tensor parallel on this machine: tp=1 (one process, 2 threads) against tp=2 (two ranks, 1 thread each) on the same
model, decoding batch 1: tok/s, and at tp=2 the time rank 0 spends in collectives per decode step (the step's
message, the embedding's sum, the sums after o and down, the logits gather; waiting for the other rank counts too).
On a 2-core machine the figure to watch is that share, not a speed-up. tp=1 runs with the fused C decode step (the
default) and without it (the torch path); tp=2 with it, or with --tp2-torch-path without it. The arms alternate,
rounds are medians. Because rank 0's collective time includes waiting for the slower rank, the script also times one
decode step's collectives alone (the same sizes) between two otherwise idle processes, both Hearth's and the plain
c10d calls, and reports `collective_share_floor`: that idle-pair cost over itself plus the ranks' compute (the tp=2
step less its collective time), the least share this transport allows here. Prints one JSON object.
    python benchmarks/parallel.py --model smollm2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def decode_round(llm, prompt_ids: list[int], tokens: int) -> tuple[float, float, int]:
    """(decode seconds, seconds in collectives during decode, decode steps) of one greedy request."""
    from hearth.layers.distributed import get_tensor_parallel
    from hearth.sampling_params import SamplingParams

    engine = llm.engine
    engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), "bench")
    engine.step()  # prefill and the first token
    tp = get_tensor_parallel()
    tp.collective_s = 0.0
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return time.perf_counter() - start, tp.collective_s, steps


def _collectives_alone(rank: int, port: int, layers: int, hidden: int, vocab: int, steps: int, out) -> None:
    """One process of the idle pair: `steps` decode steps' worth of collectives, two ways, alternating: Hearth's
    (hearth.layers.distributed, engine.parallel.broadcast_step) and the plain c10d calls of the same sizes
    (broadcast_object_list, dist.all_reduce, dist.gather). Rank 0 puts {way: seconds per step} in `out`."""
    import datetime

    import torch
    import torch.distributed as dist

    from hearth.engine.parallel import broadcast_step, init_step_group
    from hearth.layers.context import Context
    from hearth.layers.distributed import all_reduce, gather_last_dim, set_tensor_parallel, split_range

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    init_step_group(rank, timeout)
    set_tensor_parallel(rank, 2)
    ctx = Context(q_starts=[0, 1], context_lens=[40], slot_mapping=torch.tensor([39]), block_tables=torch.tensor([[1, 2, 3]]),
                  decode_seq_idx=[0], decode_rows=torch.tensor([0]), decode_context_lens=torch.tensor([40]),
                  decode_block_tables=torch.tensor([[1, 2, 3]]), single_decode_slots=torch.arange(40))  # fmt: skip
    step = (torch.tensor([5]), torch.tensor([39]), [0], ctx)  # a decode step as the engine sends it
    parts = [b - a for a, b in (split_range(vocab, r, 2) for r in range(2))]
    x, logits = torch.zeros(1, hidden, dtype=torch.bfloat16), torch.zeros(1, parts[rank])
    gathered = [torch.empty(1, max(parts)) for _ in range(2)] if rank == 0 else None

    def hearth_step() -> None:
        broadcast_step(step if rank == 0 else None)
        all_reduce(x)  # the embedding
        for _ in range(2 * layers):
            all_reduce(x)
        gather_last_dim(logits, parts)

    def c10d_step() -> None:
        dist.broadcast_object_list([step if rank == 0 else None], src=0)
        for _ in range(2 * layers + 1):
            dist.all_reduce(x.float())
        dist.gather(torch.nn.functional.pad(logits, (0, max(parts) - parts[rank])), gathered, dst=0)

    times: dict[str, list[float]] = {"hearth": [], "c10d": []}
    for i in range(steps + 3):
        for name, fn in (("hearth", hearth_step), ("c10d", c10d_step)):
            dist.barrier()
            start = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        out.put({name: statistics.median(t) for name, t in times.items()})
    dist.destroy_process_group()


def collectives_alone_s(layers: int, hidden: int, vocab: int, steps: int = 20) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_collectives_alone, args=(r, port, layers, hidden, vocab, steps, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="append the JSON line to this file")
    parser.add_argument("--tp2-torch-path", action="store_true", help="tp=2 decodes through the torch path")
    args = parser.parse_args(argv)
    import torch

    from hearth.llm import LLM

    arms = {}
    os.environ["HEARTH_FUSED_DECODE"] = "1"
    arms["tp1_fused"] = (LLM(args.model, max_model_len=512), 2)
    os.environ["HEARTH_FUSED_DECODE"] = "0"
    arms["tp1"] = (LLM(args.model, max_model_len=512), 2)
    # one tensor-parallel engine per process (one process group): the fused step unless --tp2-torch-path
    os.environ["HEARTH_FUSED_DECODE"] = "0" if args.tp2_torch_path else "1"  # the spawned rank reads it too
    arms["tp2"] = (LLM(args.model, max_model_len=512, tensor_parallel_size=2), 1)
    os.environ.pop("HEARTH_FUSED_DECODE")
    prompt = arms["tp1"][0].tokenizer.encode("The history of the printing press begins")
    results: dict[str, list] = {name: [] for name in arms}
    try:
        for _ in range(args.rounds):
            for name, (llm, threads) in arms.items():
                torch.set_num_threads(threads)
                results[name].append(decode_round(llm, prompt, args.tokens))
    finally:
        for llm, _ in arms.values():
            llm.close()
    record = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds}
    for name, rounds in results.items():
        seconds = statistics.median(r[0] for r in rounds)
        steps = rounds[0][2]
        record[f"{name}_tok_s"] = round(steps / seconds, 1)
        record[f"{name}_step_ms"] = round(1000 * seconds / steps, 2)
    record["tp2_path"] = "torch" if args.tp2_torch_path else "fused"
    tp2 = results["tp2"]
    record["tp2_collective_ms_per_step"] = round(1000 * statistics.median(r[1] / r[2] for r in tp2), 2)
    record["tp2_collective_share"] = round(statistics.median(r[1] / r[0] for r in tp2), 3)
    record["tp2_vs_tp1_fused"] = round(record["tp2_tok_s"] / record["tp1_fused_tok_s"], 2)
    record["tp2_vs_tp1_unfused"] = round(record["tp2_tok_s"] / record["tp1_tok_s"], 2)
    cfg = arms["tp1"][0].engine.model_config
    alone = collectives_alone_s(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    record["collectives_alone_ms_per_step"] = round(1000 * alone["hearth"], 2)
    record["collectives_alone_c10d_ms_per_step"] = round(1000 * alone["c10d"], 2)
    # the share the collectives would take at their idle-pair cost over the ranks' own compute (the step less the
    # measured collective time): the floor on this machine for this transport
    compute = record["tp2_step_ms"] - record["tp2_collective_ms_per_step"]
    record["tp2_rank_compute_ms_per_step"] = round(compute, 2)
    record["collective_share_floor"] = round(1000 * alone["hearth"] / (1000 * alone["hearth"] + compute), 3)
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
