"""`hearth bench MODEL [--vs llama.cpp]`: single-request prefill and decode speed, beside peers on the same GGUF."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    from hearth.cli.main import env_epilog
    from hearth.cli.serve import add_speculative_args

    p = sub.add_parser(
        "bench", help="Benchmark a model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure prefill and decode tok/s at batch 1 through the engine. With --vs, run the peers on the "
        "same GGUF in the same run, alternating with Hearth, and report medians, spreads and ratios, the memory "
        "bandwidth and decode roofline, and each runtime's peak resident memory.",
        epilog="examples:\n  hearth bench smollm2 --vs llama.cpp --json\n  hearth bench smollm2 --vs all\n\n"
        "llama.cpp needs the optional extra: pip install 'hearth[bench]' (docs/performance.md gives the build flags)\n\n"
        + env_epilog(["HEARTH_NUM_THREADS"]),
    )  # fmt: skip
    p.add_argument("model", help="smollm2, a .gguf file, an HF folder")
    p.add_argument("--vs", action="append", default=[], metavar="PEER",
                   help="also run a peer: llama.cpp, transformers, or all (repeatable)")  # fmt: skip
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for prefill (default 512)")
    p.add_argument("--decode-len", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up (default 3)")
    p.add_argument("--dtype", default="auto", help="Hearth compute dtype (default auto)")
    p.add_argument("--threads", type=int, help="threads for every runtime (default: physical cores)")
    p.add_argument(
        "--int8-prefill",
        action="store_true",
        help="Hearth prefills with int8 activations (llama.cpp's arithmetic), as serve --int8-prefill",
    )
    p.add_argument("--lm-head-int8", action="store_true", help="Hearth holds a bf16 LM head as Q8_0 (serve --lm-head-int8)")
    p.add_argument("--int8-weights", action="store_true",
                   help="Hearth holds every dense bf16 projection as Q8_0 (serve --int8-weights)")  # fmt: skip
    add_speculative_args(p)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="one runtime in memory at a time, each loaded anew every round (default: when the file is "
                   "larger than a quarter of RAM and peers are compared)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the JSON record")
    p.add_argument("--out", help="append the JSON line to this file")
    p.set_defaults(func=cmd_bench)


def peers(values: list[str]) -> list[str]:
    from hearth.bench import PEERS

    out: list[str] = []
    for value in values:
        for name in value.split(","):
            for peer in PEERS if name == "all" else [name]:
                if peer not in out:
                    out.append(peer)
    return out


def cmd_bench(args) -> int:
    from hearth.bench import run_bench
    from hearth.cli.serve import speculative_kwargs

    record = run_bench(args.model, peers(args.vs), args.prompt_len, args.decode_len, args.repeat, args.dtype,
                       args.threads, int8_prefill=args.int8_prefill, lm_head_int8=args.lm_head_int8,
                       int8_weights=args.int8_weights,
                       speculative=speculative_kwargs(args),
                       sequential=args.sequential)  # fmt: skip
    line = json.dumps(record)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    if args.json:
        print(line)
        return 0
    print(f"{record['model']}  ({record['device']}, {record['threads']} threads, {record['date']})")
    print(f"  {'runtime':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for name in ["hearth", *peers(args.vs)]:
        r = record[name]
        print(f"  {name:<14}{r.get('prefill_tok_s', '-')!s:>15}{r.get('decode_tok_s', '-')!s:>14}"
              f"{r['peak_rss_mb']!s:>13}")  # fmt: skip
    print(f"  read bandwidth {record['read_bandwidth_gb_s']} GB/s (copy {record['bandwidth_probe_gb_s']}), decode roofline "
          f"{record['roofline_decode_tok_s']} tok/s, Hearth at {record['decode_vs_roofline']:.0%} "
          f"({record['achieved_gb_s']} GB/s)")  # fmt: skip
    if "spec_draft_tokens" in record["hearth"]:
        h = record["hearth"]
        print(f"  speculative: {h['spec_accepted_tokens']} of {h['spec_draft_tokens']} draft tokens kept "
              f"({h['spec_acceptance']:.0%})")  # fmt: skip
    ratios = {k: v for k, v in record.items() if "_vs_" in k and k != "decode_vs_roofline"}
    if ratios:
        print("  " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    return 0
