"""Tensor parallel on this machine: tp=1 (one process, 2 threads) against tp=2 (two ranks, 1 thread each) on the same
model, decoding batch 1: tok/s, and at tp=2 the time rank 0 spends in collectives per decode step (the step's
broadcast, the all-reduces after o and down, the logits gather; waiting for the other rank counts too). On a 2-core
machine the figure to watch is that share, not a speed-up. tp=1 runs with and without the fused C decode step, which
tensor parallel does not use. The arms alternate, rounds are medians. Because rank 0's collective time includes
waiting for the slower rank, the script also times one decode step's collectives alone (the same sizes: a step
broadcast, two all-reduces per layer, the logits gather) between two otherwise idle processes: the pure transfer
cost. Prints one JSON object.
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


def _collectives_alone(rank: int, port: int, layers: int, hidden: int, vocab_part: int, steps: int, out) -> None:
    """One process of the idle pair: `steps` decode steps' worth of collectives; rank 0 puts seconds/step in `out`."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    step = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), [0], {"slots": torch.arange(64)})
    x, logits = torch.zeros(1, hidden), torch.zeros(1, vocab_part)
    parts = [torch.empty_like(logits) for _ in range(2)] if rank == 0 else None
    times = []
    for _ in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        dist.broadcast_object_list([step if rank == 0 else None], src=0)
        for _ in range(2 * layers):
            dist.all_reduce(x)
        dist.gather(logits, parts, dst=0)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(times[3:]))
    dist.destroy_process_group()


def collectives_alone_s(layers: int, hidden: int, vocab: int, steps: int = 20) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_collectives_alone, args=(r, port, layers, hidden, vocab // 2, steps, out)) for r in (0, 1)]
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
    args = parser.parse_args(argv)
    import torch

    from hearth.llm import LLM

    arms = {}
    os.environ["HEARTH_FUSED_DECODE"] = "1"
    arms["tp1_fused"] = (LLM(args.model, max_model_len=512), 2)
    os.environ["HEARTH_FUSED_DECODE"] = "0"
    arms["tp1"] = (LLM(args.model, max_model_len=512), 2)
    os.environ.pop("HEARTH_FUSED_DECODE")
    arms["tp2"] = (LLM(args.model, max_model_len=512, tensor_parallel_size=2), 1)
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
    tp2 = results["tp2"]
    share = statistics.median(r[1] / r[0] for r in tp2)
    record["tp2_collective_ms_per_step"] = round(1000 * statistics.median(r[1] / r[2] for r in tp2), 2)
    record["tp2_collective_share"] = round(share, 3)
    record["tp2_vs_tp1_unfused"] = round(record["tp2_tok_s"] / record["tp1_tok_s"], 2)
    cfg = arms["tp1"][0].engine.model_config
    alone = collectives_alone_s(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    record["collectives_alone_ms_per_step"] = round(1000 * alone, 2)
    record["collectives_alone_share_of_tp2_step"] = round(alone / (record["tp2_step_ms"] / 1000), 3)
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
