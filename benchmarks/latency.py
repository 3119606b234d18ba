"""Single-request latency: prefill tok/s for a 512-token prompt and decode tok/s for 128 tokens, batch 1, optionally
beside llama.cpp and transformers on the same GGUF (alternating, medians; see hearth/bench.py and docs/performance.md).

Prints one JSON object (and appends it to --out).
    python benchmarks/latency.py --model smollm2 --vs llama.cpp --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from hearth.cli.bench import peers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--vs", action="append", default=[], help="llama.cpp, transformers or all (repeatable)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    from hearth.bench import run_bench

    record = run_bench(args.model, peers(args.vs), args.prompt_len, args.decode_len, args.repeat, args.dtype,
                       args.threads)  # fmt: skip
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
