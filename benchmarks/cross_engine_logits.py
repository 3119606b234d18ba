"""Hearth's logits against llama.cpp's on the same GGUF file and the same token ids: a cross-engine correctness check
for files no reference framework can load (random-weight files of the real shapes, llama.cpp's layouts).

Both engines run the prompt once (never resident together: Hearth first, then llama.cpp through llama-cpp-python with
`logits_all`). Prints one JSON object: Pearson correlation and max |difference| of the logits after the prompt (the
first generated step's) and over every prompt position, whether the argmax agrees, and the overlap of the top 10.

On random MoE weights a rounding difference can flip a router's choice and the difference compounds over the layers,
so write the file with `--unambiguous-routing` (benchmarks/gpt_oss_20b.py, benchmarks/deepseek_moe.py) for this check.

    LLAMA_CPP_LIB_PATH=.bench/build/bin python benchmarks/cross_engine_logits.py .bench/gpt-oss-2l-unamb.gguf
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np
import torch


def hearth_logits(path: str, ids: list[int], dtype: str | None) -> np.ndarray:
    """Every position's logits [n, vocab] (float32) through Hearth's model, one sequence, no KV cache."""
    from hearth.layers.context import Context, reset_context, set_context
    from hearth.llm import LLM

    llm = LLM(path, max_model_len=max(256, len(ids) + 16), max_num_seqs=1, **({"dtype": dtype} if dtype else {}))
    model = llm.engine.runner.model
    set_context(Context(q_starts=[0, len(ids)], context_lens=[len(ids)], prefill_seq_idx=[0]))
    try:
        with torch.inference_mode():
            ids_t = torch.tensor(ids)
            logits = model.compute_logits(model(ids_t, torch.arange(len(ids)))).float().numpy().copy()
    finally:
        reset_context()
        llm.close()
    return logits


def llama_cpp_logits(path: str, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=max(256, len(ids) + 16), n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)  # fmt: skip
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])

    last_ours, last_theirs = ours[-1], theirs[-1]
    top_ours, top_theirs = set(np.argsort(-last_ours)[:10].tolist()), set(np.argsort(-last_theirs)[:10].tolist())
    return {
        "first_step_correlation": round(corr(last_ours, last_theirs), 5),
        "first_step_max_abs_diff": round(float(np.abs(last_ours - last_theirs).max()), 4),
        "first_step_logit_std": round(float(last_theirs.std()), 4),
        "first_step_argmax_agrees": bool(last_ours.argmax() == last_theirs.argmax()),
        "first_step_top10_overlap": len(top_ours & top_theirs),
        "all_positions_correlation": round(corr(ours, theirs), 5),
        "positions_argmax_agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a GGUF file both engines open")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", help="Hearth's activation dtype (default: its default, bf16 on CPU)")
    parser.add_argument("--min-correlation", type=float, help="exit 1 when the first step's correlation is lower")
    args = parser.parse_args(argv)

    from hearth.tokenizer import load_tokenizer

    vocab = load_tokenizer(args.path).vocab_size
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(min(1000, vocab // 4), min(vocab, 100_000), size=args.prompt_len).tolist()
    start = time.perf_counter()
    ours = hearth_logits(args.path, ids, args.dtype)
    gc.collect()
    theirs = llama_cpp_logits(args.path, ids, args.threads)
    record = {"bench": "cross_engine_logits", "path": args.path, "prompt_len": len(ids), "hearth_dtype": args.dtype
              or "default", **compare(ours, theirs), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    print(json.dumps(record))
    if args.min_correlation is not None and record["first_step_correlation"] < args.min_correlation:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
