"""Tensor parallel on this machine: tp=1 (one process, 2 threads) against tp=2 (two ranks, 1 thread each) on the same
model, decoding batch 1: tok/s, and at tp=2 the time rank 0 spends in collectives per decode step (the step's
broadcast, the all-reduces after o and down, the logits gather; waiting for the other rank counts too). On a 2-core
machine the figure to watch is that share, not a speed-up. tp=1 runs with and without the fused C decode step, which
tensor parallel does not use. The arms alternate, rounds are medians; prints one JSON object.
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
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
