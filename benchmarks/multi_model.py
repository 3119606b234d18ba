"""A multi-model server's cold load: the first request to a second model (the embedded SmolLM2 GGUF served under a
second name while the first stays loaded) against the same request once that model is warm, alternating the two arms
so that other load on the machine hits both alike. Also the cost of switching between two loaded models (a request
to A right after one to B, against A after A).

Prints one JSON object (and appends it to --out).
    python benchmarks/multi_model.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

sys.path.insert(0, ".")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from hearth.api.app import create_app
    from hearth.api.models import LocalModels, ModelRegistry
    from hearth.config import EngineConfig
    from hearth.loader.resolve import embedded_model_path

    path = embedded_model_path()

    class Two(LocalModels):
        def catalog(self):
            return {"a": path, "b": path}

    registry = ModelRegistry(Two(EngineConfig(max_model_len=1024, max_num_seqs=4)))
    body = {"prompt": "The capital of France is", "max_tokens": args.max_tokens, "temperature": 0}

    def request(client, model: str) -> float:
        start = time.perf_counter()
        r = client.post("/v1/completions", json={**body, "model": model})
        assert r.status_code == 200, r.text
        return time.perf_counter() - start

    cold, warm, switch, same = [], [], [], []
    with TestClient(create_app(None, None, None, None, models=registry)) as c:
        request(c, "a")  # the first model, and the process's first load (imports, kernels built), out of the way
        for _ in range(args.rounds):
            cold.append(request(c, "b"))  # b was unloaded: a cold load, with a loaded
            warm.append(request(c, "b"))
            switch.append(request(c, "a"))  # a right after b
            same.append(request(c, "a"))  # a right after a
            c.portal.call(registry.unload, "b")
    med = statistics.median
    result = {"benchmark": "multi_model", "model": "smollm2 (embedded GGUF)", "rounds": args.rounds,
              "max_tokens": args.max_tokens, "cold_first_request_s": round(med(cold), 3),
              "warm_request_s": round(med(warm), 3), "cold_load_s": round(med(cold) - med(warm), 3),
              "switch_request_s": round(med(switch), 3), "same_model_request_s": round(med(same), 3),
              "switch_over_same": round(med(switch) / med(same), 3)}  # fmt: skip
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
