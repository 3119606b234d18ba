"""Hearth's logits against llama.cpp's on the same GGUF file and the same token ids: a cross-engine correctness check
for files no reference framework can load (random-weight files of the real shapes, llama.cpp's layouts).

Both engines run the prompt and one decode step (never resident together: Hearth first, then llama.cpp through
llama-cpp-python with `logits_all`). Prints one JSON object: for the first step (the logits after the prompt) and the
decode step after it, the Pearson correlation and max |difference| of the logits, whether the argmax agrees, and the
overlap of the top 10.

On random MoE weights a rounding difference can flip a router's choice and the difference compounds over the layers,
so write the file with `--unambiguous-routing` (benchmarks/gpt_oss_20b.py, benchmarks/deepseek_moe.py) for this check.

    LLAMA_CPP_LIB_PATH=.bench/build/bin python benchmarks/cross_engine_logits.py FILE.gguf --min-correlation 0.99
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import numpy as np
import torch


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def check_logits(path: str, prompt_len: int = 16, threads: int | None = None, dtype: str = "auto", seed: int = 0,
                 max_id: int = 100_000) -> dict:  # fmt: skip
    """Hearth and llama.cpp (llama-cpp-python, logits_all) on the same file and prompt (random ids in [256, max_id)),
    one engine after the other: the logits of the first step (the prompt's last position) and of one decode step after
    it (the token Hearth chose), as Pearson correlations over the vocabulary, their largest difference, and whether the
    top tokens agree. Hearth runs with its defaults through its engine (prefill, then its decode step)."""
    from hearth import LLM
    from hearth.sampling_params import SamplingParams

    threads = threads or int(os.environ.get("HEARTH_NUM_THREADS") or 0) or 2
    torch.set_num_threads(threads)
    llm = LLM(path, dtype=dtype, max_model_len=max(256, prompt_len + 8), max_num_seqs=1, enable_prefix_caching=False)
    vocab = llm.engine.model_config.vocab_size
    prompt = np.random.default_rng(seed).integers(256, min(vocab, max_id), prompt_len).tolist()
    model = llm.engine.runner.model
    steps: list[np.ndarray] = []
    compute_logits = model.compute_logits

    def keep(hidden_states):  # every step's logits, as the sampler sees them
        logits = compute_logits(hidden_states)
        steps.append(logits[-1].float().numpy().copy())
        return logits

    model.compute_logits = keep
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    ours = steps[:2]
    hearth_dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    llm.close()
    del llm, model
    gc.collect()
    import llama_cpp

    ref = llama_cpp.Llama(model_path=path, n_ctx=max(256, prompt_len + 8), n_threads=threads, logits_all=True,
                          verbose=False)  # fmt: skip
    ref.eval(prompt)
    ref.eval([out.token_ids[0]])
    theirs = [np.array(ref.scores[prompt_len - 1]), np.array(ref.scores[prompt_len])]
    record = {"bench": "cross_engine_logits", "model": os.path.basename(path), "prompt_len": prompt_len,
              "hearth_dtype": hearth_dtype, "threads": threads}  # fmt: skip
    for name, a, b in zip(("first_step", "decode_step"), ours, theirs):
        top_a, top_b = set(np.argsort(-a)[:10].tolist()), set(np.argsort(-b)[:10].tolist())
        record[name] = {"correlation": round(correlation(a, b), 5), "max_abs_diff": round(float(np.abs(a - b).max()), 4),
                        "logit_std": round(float(b.std()), 4), "top1_agrees": int(a.argmax()) == int(b.argmax()),
                        "top10_overlap": len(top_a & top_b)}  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a GGUF file both engines open")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="threads for both engines (default HEARTH_NUM_THREADS or 2)")
    parser.add_argument("--dtype", default="auto", help="Hearth's activation dtype (default: its default)")
    parser.add_argument("--min-correlation", type=float, help="exit 1 when a step's correlation is lower")
    args = parser.parse_args(argv)
    record = check_logits(args.path, args.prompt_len, args.threads, args.dtype, args.seed)
    print(json.dumps(record))
    worst = min(record["first_step"]["correlation"], record["decode_step"]["correlation"])
    return 1 if args.min_correlation is not None and worst < args.min_correlation else 0


if __name__ == "__main__":
    sys.exit(main())
