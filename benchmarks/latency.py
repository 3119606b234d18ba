"""Single-request latency: prefill tok/s for a 512-token prompt and decode tok/s for 128 tokens, batch 1.

Prints one JSON object (and appends it to --out). Median of --repeat runs after one warm-up, as BENCHMARKS.md asks.
    python benchmarks/latency.py --model smollm2 --out bench.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token (every parameter and packed weight once)."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + [getattr(module, n, None) for n in
                                                           ("weight", "packed", "scales_and_zeros", "bias")]:  # fmt: skip
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def time_request(engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the remaining max_tokens - 1 tokens)."""
    from hearth.sampling_params import SamplingParams

    engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), "bench")
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for _ in engine.step():
            if first is None:
                first = time.perf_counter()
    return first - start, time.perf_counter() - first


def bench_hearth(args) -> dict:
    from hearth.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine
    from hearth.loader.resolve import resolve_model

    engine = LLMEngine(resolve_model(args.model), EngineConfig(max_model_len=2048, max_num_seqs=1,
                                                               max_num_batched_tokens=args.prompt_len,
                                                               enable_prefix_caching=False, dtype=args.dtype))  # fmt: skip
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
    time_request(engine, prompt[:32], 8)  # warm-up
    prefill, decode = [], []
    for _ in range(args.repeat):
        ttft, _ = time_request(engine, prompt, 1)
        prefill.append(args.prompt_len / ttft)
        _, rest = time_request(engine, prompt[:16], args.decode_len)
        decode.append((args.decode_len - 1) / rest)
    wbytes = weight_bytes(engine.runner.model)
    decode_tok_s = statistics.median(decode)
    return {
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "prefill_runs": [round(x, 1) for x in prefill],
        "decode_tok_s": round(decode_tok_s, 1),
        "decode_runs": [round(x, 1) for x in decode],
        "weight_bytes": wbytes,
        "bandwidth_gb_s": round(wbytes * decode_tok_s / 1e9, 2),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "quant": engine.model_info.quantization,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    import torch

    result = {
        "bench": "latency", "git": git_rev(), "date": datetime.date.today().isoformat(),
        "device": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
        "threads": torch.get_num_threads(), "model": args.model, "prompt_len": args.prompt_len,
        "decode_len": args.decode_len,
    }  # fmt: skip
    result.update(bench_hearth(args))
    result["peak_mem_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
