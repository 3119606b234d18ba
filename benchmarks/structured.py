"""Structured-output overhead: decode throughput with and without a JSON-schema constraint, in the same run.

N clients (--concurrency, default 1 and 16) each send --requests-per-client requests one after another straight to
the engine (no HTTP: the constraint's cost is what is measured), greedy, --max-tokens tokens out. The constrained arm's
schema is an array of short strings that cannot be complete within max_tokens, so both arms decode the same number
of tokens and every step of the constrained arm computes masks. Arms alternate, --repeat times; printed: one JSON
object with each arm's output tokens per wall second and per CPU second (medians) and the constrained/free ratios
per concurrency.

    python benchmarks/structured.py --concurrency 1 16 --repeat 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time


def run_arm(engine, prompt_ids: list[int], params, clients: int, per_client: int) -> tuple[float, float]:
    """(output tokens per wall second, per CPU second of this process) of `clients` closed-loop clients sending
    `per_client` requests each. On a machine other processes load, CPU time varies far less than wall time, and it
    counts the mask thread's work too, whether or not it overlapped the forward."""
    ids = itertools.count()
    left = {c: per_client for c in range(clients)}
    owner: dict[str, int] = {}

    def submit(client: int) -> None:
        request_id = f"r{next(ids)}"
        owner[request_id] = client
        left[client] -= 1
        engine.add_request(prompt_ids, params, request_id)

    tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    for client in range(clients):
        submit(client)
    while engine.has_unfinished():
        for delta in engine.step():
            tokens += len(delta.token_ids)
            if delta.finished:
                client = owner.pop(delta.request_id)
                if left[client]:
                    submit(client)
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HEARTH_NUM_THREADS", str(args.threads))

    from hearth.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine
    from hearth.engine.structured import json_schema_text
    from hearth.loader.resolve import resolve_model
    from hearth.sampling_params import Grammar, SamplingParams

    engine = LLMEngine(resolve_model(args.model), EngineConfig(max_model_len=1024, max_num_seqs=max(args.concurrency)))
    prompt = "<|im_start|>user\nList as many fruits as you can, as a JSON array.<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = engine.tokenizer.encode(prompt)
    schema = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 4 * args.max_tokens}
    arms = {
        "free": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
        "json": SamplingParams(temperature=0, max_tokens=args.max_tokens,
                               grammar=Grammar("json_schema", json_schema_text(schema))),
    }  # fmt: skip
    run_arm(engine, prompt_ids, arms["json"], 1, 1)  # warm-up: compiles the grammar, builds the llguidance tokenizer
    rows = {}
    for clients in args.concurrency:
        runs: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
        for _ in range(args.repeat):
            for arm, params in arms.items():  # interleaved, so load from other processes hits both arms alike
                runs[arm].append(run_arm(engine, prompt_ids, params, clients, args.requests_per_client))
        row = {}
        for k, name in enumerate(("tok_s", "tok_per_cpu_s")):
            free = statistics.median(r[k] for r in runs["free"])
            constrained = statistics.median(r[k] for r in runs["json"])
            row[name] = {"free": round(free, 1), "json": round(constrained, 1), "ratio": round(constrained / free, 3)}
        rows[str(clients)] = {**row, "runs": {arm: [[round(x, 1) for x in r] for r in rs] for arm, rs in runs.items()}}
    print(json.dumps({"bench": "structured", "model": args.model, "threads": args.threads,
                      "max_tokens": args.max_tokens, "concurrency": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
