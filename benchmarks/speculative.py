"""Speculative decoding benchmark: prompt lookup (n-gram) against plain decoding, in the same run, on SmolLM2.

1. Batch 1, temperature 0, on prompts written for it whose answers reuse their input (rewrite a paragraph, edit
   code, extract fields from a document): each prompt runs --repeat times on a plain engine and on a speculating one,
   the arms alternating (the machine may be shared); per prompt and arm the median time after the first token; reports
   decode tok/s of each arm over all prompts, their ratio, the share of drafts kept and whether the texts are identical.
2. N concurrent clients (--clients, default 16): all requests submitted at once to each engine, aggregate output tok/s
   with and without speculation, in alternating rounds.
3. --threshold: the cost of a verification step against a plain decode step at batch sizes 1..16, with every
   sequence carrying k forced drafts, to place EngineConfig.speculative_max_batch (docs/speculative.md).

    python benchmarks/speculative.py --max-tokens 64 --repeat 3 --clients 16 --threshold --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hearth.config import EngineConfig  # noqa: E402
from hearth.engine.llm_engine import LLMEngine  # noqa: E402
from hearth.loader.resolve import resolve_model  # noqa: E402
from hearth.sampling_params import SamplingParams  # noqa: E402

PARAGRAPHS = [
    "The old mill stood at the edge of the village for more than two hundred years. Every spring the river rose and "
    "turned its wheel faster, and the miller worked late into the night grinding grain for the farms nearby.",
    "Our team meets every Monday at nine to review the week's plan. Each person shares what they finished, what they "
    "are working on now, and anything that is blocking them, so that problems are found early.",
    "The library will be closed on Friday for maintenance of the heating system. Books that are due on that day can "
    "be returned on Saturday without a late fee, and the online catalogue will stay available.",
    "Solar panels convert sunlight into electricity using layers of silicon. When light hits the panel, electrons are "
    "knocked loose and flow through a circuit, producing a current that can power a home.",
    "The recipe calls for two cups of flour, one cup of sugar, three eggs and a spoon of butter. Mix the dry "
    "ingredients first, then add the eggs one at a time, and bake for thirty minutes.",
    "The train to the coast leaves from platform four at ten past eight. Passengers should arrive early, because the "
    "station is busy in the morning and the doors close two minutes before departure.",
    "Bees visit thousands of flowers each day to collect nectar and pollen. As they move from flower to flower they "
    "carry pollen with them, which helps the plants produce seeds and fruit.",
]
CODE = [
    "def total_price(items):\n    total = 0\n    for item in items:\n        total = total + item.price * item.count\n"
    "    return total\n",
    "def find_user(users, name):\n    for user in users:\n        if user.name == name:\n            return user\n"
    "    return None\n",
    "def average(values):\n    if len(values) == 0:\n        return 0\n    return sum(values) / len(values)\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n"
    "        self.count = self.count + 1\n        return self.count\n",
    "def read_lines(path):\n    with open(path) as f:\n        lines = f.readlines()\n    return [line.strip() for "
    "line in lines]\n",
    "def is_even(number):\n    if number % 2 == 0:\n        return True\n    else:\n        return False\n",
    "def merge(a, b):\n    result = dict(a)\n    for key in b:\n        result[key] = b[key]\n    return result\n",
]
DOCUMENTS = [
    "Invoice number: 4471\nDate: 12 March 2024\nCustomer: Anna Berg\nAddress: 14 Hill Road, Oslo\nTotal: 320.50 EUR\n"
    "Payment due: 11 April 2024",
    "Name: Tomas Novak\nPosition: Senior Engineer\nDepartment: Infrastructure\nStart date: 3 January 2021\n"
    "Office: Prague, building B\nPhone: +420 601 555 019",
    "Order ID: A-99213\nProduct: Wireless keyboard\nQuantity: 2\nUnit price: 45.00 USD\nShipping: Express\n"
    "Delivery address: 88 Lake Street, Chicago",
    "Patient: Maria Lopez\nDate of visit: 5 June 2023\nDoctor: Dr. Chen\nReason: annual check-up\n"
    "Next appointment: 5 June 2024",
    "Flight: KL 1234\nFrom: Amsterdam\nTo: Lisbon\nDeparture: 07:45\nArrival: 10:05\nGate: D7\nSeat: 14C",
    "Book title: The Quiet River\nAuthor: Helen Marsh\nPublisher: North Press\nYear: 2019\nPages: 312\nISBN: 978-1-23456-789-7",
    "Event: Spring concert\nVenue: City Hall\nDate: 20 April 2024\nTime: 19:30\nTickets: 25 EUR\nContact: events@example.org",
]


def prompt_set() -> list[str]:
    out = []
    for text in PARAGRAPHS:
        out.append(f"Rewrite the following paragraph, keeping every sentence but replacing the word 'the' with 'a' "
                   f"where it fits:\n\n{text}")  # fmt: skip
    for code in CODE:
        out.append(f"Add a docstring and type hints to this Python function. Return the whole code.\n\n{code}")
    for doc in DOCUMENTS:
        out.append(f"Copy every field of this document into a JSON object, with the same names and values:\n\n{doc}")
    return out


def encode_chat(engine: LLMEngine, text: str) -> list[int]:
    from hearth.chat.template import load_chat_template

    template = load_chat_template(engine.tokenizer)
    rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return engine.tokenizer.encode(rendered, add_special_tokens=False)


def timed(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the rest)."""
    engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens), "bench")
    tokens: list[int] = []
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for delta in engine.step():
            if first is None and delta.token_ids:
                first = time.perf_counter()
            tokens.extend(delta.token_ids)
    return tokens, first - start, time.perf_counter() - first


def batch1(plain: LLMEngine, spec: LLMEngine, prompts: list[list[int]], max_tokens: int, repeat: int) -> dict:
    """Each prompt `repeat` times on each arm, the arms alternating; per prompt and arm the median decode time."""
    times: dict[tuple[int, str], list[float]] = {}
    tokens: dict[tuple[int, str], list[int]] = {}
    counts = {"drafted": 0, "kept": 0}
    for r in range(repeat):
        for i, ids in enumerate(prompts):
            arms = [("plain", plain), ("spec", spec)]
            for name, engine in arms if (i + r) % 2 == 0 else arms[::-1]:
                before = (engine.scheduler.num_draft_tokens, engine.scheduler.num_accepted_tokens)
                out, _, rest = timed(engine, ids, max_tokens)
                if name == "spec":
                    counts["drafted"] += engine.scheduler.num_draft_tokens - before[0]
                    counts["kept"] += engine.scheduler.num_accepted_tokens - before[1]
                times.setdefault((i, name), []).append(rest)
                tokens[(i, name)] = out
    rows, identical = [], 0
    for i in range(len(prompts)):
        n = len(tokens[(i, "plain")]) - 1
        same = tokens[(i, "plain")] == tokens[(i, "spec")]
        identical += same
        t_plain, t_spec = statistics.median(times[(i, "plain")]), statistics.median(times[(i, "spec")])
        rows.append({"prompt": i, "tokens": n + 1, "plain_s": round(t_plain, 4), "spec_s": round(t_spec, 4),
                     "ratio": round(t_plain / t_spec, 2), "identical": same})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    decoded = sum(r["tokens"] - 1 for r in rows)
    plain_total = decoded / sum(r["plain_s"] for r in rows)
    spec_total = decoded / sum(r["spec_s"] for r in rows)
    return {
        "repeat": repeat, "plain_tok_s": round(plain_total, 1), "spec_tok_s": round(spec_total, 1),
        "speedup": round(spec_total / plain_total, 2),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "identical": f"{identical}/{len(rows)}",
        "acceptance": round(counts["kept"] / max(1, counts["drafted"]), 3),
        "per_prompt": rows,
    }  # fmt: skip


def concurrent(engine: LLMEngine, prompts: list[list[int]], clients: int, max_tokens: int) -> float:
    """Aggregate output tok/s of `clients` requests submitted together."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for c in range(clients):
        engine.add_request(prompts[c % len(prompts)], params, f"c{c}")
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished():
        for delta in engine.step():
            produced += len(delta.token_ids)
    return produced / (time.perf_counter() - start)


def threshold(engine: LLMEngine, prompts: list[list[int]], k: int, sizes: list[int], repeat: int) -> list[dict]:
    """Seconds per step: B sequences decoding one token, against B sequences verifying k forced drafts each."""
    from hearth.engine.scheduler import Batch
    from hearth.engine.sequence import Sequence

    out = []
    runner = engine.runner
    for b in sizes:
        seqs = [Sequence(prompts[i % len(prompts)][:64], SamplingParams(temperature=0)) for i in range(b)]
        bm = engine.scheduler.block_manager
        for s in seqs:  # prefill each, then append one token so that it decodes
            bm.append_slots(s, s.num_tokens + k + 1)
            runner.run(Batch([s], [s.num_tokens]))
            s.num_computed_tokens = s.num_tokens
            s.append_token(100)
        times = {"plain": [], "verify": []}
        for _ in range(repeat):
            for arm in ("plain", "verify"):
                for s in seqs:
                    s.spec_tokens = [101 + j for j in range(k)] if arm == "verify" else []
                n = 1 + (k if arm == "verify" else 0)
                start = time.perf_counter()
                runner.run(Batch(list(seqs), [n] * b))
                times[arm].append(time.perf_counter() - start)
        for s in seqs:
            s.spec_tokens = []
            bm.free(s)
        plain, verify = statistics.median(times["plain"]), statistics.median(times["verify"])
        out.append({"batch": b, "plain_step_ms": round(plain * 1e3, 1), "verify_step_ms": round(verify * 1e3, 1),
                    "cost_ratio": round(verify / plain, 2)})  # fmt: skip
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=21, help="prompts at batch 1 (of the 21 written here)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the prompts at batch 1 (0: skip)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent requests for the aggregate (0: skip)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the concurrent arms")
    ap.add_argument("--threshold", action="store_true", help="measure verification cost by batch size")
    ap.add_argument("--threshold-repeat", type=int, default=15, help="steps timed per arm and batch size")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="append the JSON record to this file")
    args = ap.parse_args()

    base = dict(max_model_len=2048, max_num_seqs=max(args.clients, 1), max_num_batched_tokens=512, dtype=args.dtype)
    ref = resolve_model(args.model)
    plain = LLMEngine(ref, EngineConfig(**base))
    spec = LLMEngine(ref, EngineConfig(**base, speculative="ngram", num_speculative_tokens=args.k))
    prompts = [encode_chat(plain, p) for p in prompt_set()][: args.prompts]
    record: dict = {"bench": "speculative", "model": ref.name, "max_tokens": args.max_tokens, "k": args.k,
                    "dtype": str(plain.runner.dtype).removeprefix("torch.")}  # fmt: skip
    timed(plain, prompts[0], 8), timed(spec, prompts[0], 8)  # warm-up
    if args.repeat:
        record["batch1"] = batch1(plain, spec, prompts, args.max_tokens, args.repeat)
    if args.clients:
        runs: dict[str, list[float]] = {"plain": [], "spec": []}
        for r in range(args.rounds):
            for name, engine in [("plain", plain), ("spec", spec)][:: 1 if r % 2 == 0 else -1]:
                runs[name].append(concurrent(engine, prompts, args.clients, args.max_tokens))
        p, s = statistics.median(runs["plain"]), statistics.median(runs["spec"])
        record["concurrent"] = {"clients": args.clients, "plain_tok_s": round(p, 1), "spec_tok_s": round(s, 1),
                                "ratio": round(s / p, 2), "runs": runs}  # fmt: skip
    if args.threshold:
        record["threshold"] = threshold(plain, prompts, args.k, [1, 2, 4, 8, 16], repeat=args.threshold_repeat)
    summary = {k: v for k, v in record.items() if k != "batch1"}
    if "batch1" in record:
        summary["batch1"] = {k: v for k, v in record["batch1"].items() if k != "per_prompt"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
