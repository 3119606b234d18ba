"""Single-request latency: Hearth beside llama.cpp (llama-cpp-python) and transformers on the same GGUF.

Prefill tok/s for a `prompt_len`-token prompt and decode tok/s for `decode_len` tokens at batch 1. Each runtime runs
in its own worker process, so each peak RSS is its own; the parent alternates them (A B A B …, docs/performance.md), keeps
every run, and reports medians, spreads and ratios, the memory bandwidth measured in the same run and the decode
roofline (weight bytes read per token ÷ bandwidth; for a GGUF the file's tensors a token reads, top-k of the
experts). `hearth bench` and benchmarks/latency.py both call `run_bench`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PEERS = ("llama.cpp", "transformers")
# attributes that hold weights read on every decoded token (an Embedding's quantized lookup table is read one row
# per token and is left out; a tied LM head is counted through its int8 form or its repacked copy, `lm_blocks`)
WEIGHT_ATTRS = (
    "weight",
    "bias",
    "packed",
    "scales_and_zeros",
    "int8_weight",
    "int8_scales",
    "weight_scale_inv",
    "blocks",
    "lm_blocks",
)


def git_rev() -> str:
    try:
        cwd = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd)
        return out.stdout.strip()
    except OSError:
        return ""


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token (every parameter and packed weight once)."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + [getattr(module, n, None) for n in WEIGHT_ATTRS]
        for t in tensors:
            for part in (t.qs, t.sc, *getattr(t, "raw", ())) if hasattr(t, "qs") else (t,):  # packed or read in place
                if isinstance(part, torch.Tensor) and part.numel() and part.data_ptr() not in seen:
                    seen.add(part.data_ptr())
                    total += part.numel() * part.element_size()
    return total


def memory_bandwidth(num_bytes: int = 1 << 30, num_threads: int = 2, repeat: int = 3) -> float:
    """GB/s of a numpy copy of a `num_bytes` buffer split over threads, counting bytes read plus bytes written
    (STREAM's convention); best of `repeat`."""
    import numpy as np

    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    bounds = [i * num_bytes // num_threads for i in range(num_threads + 1)]

    def copy(i: int) -> None:
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    best = 0.0
    for _ in range(repeat):
        threads = [threading.Thread(target=copy, args=(i,)) for i in range(len(bounds) - 1)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, 2 * num_bytes / (time.perf_counter() - start) / 1e9)
    return best


def read_bandwidth(num_bytes: int = 1 << 30, num_threads: int = 2, repeat: int = 3) -> float:
    """GB/s of reading a `num_bytes` buffer once (a sum over it, split over threads): what batch-1 decode does with
    its weights, so the decode roofline is weight bytes over this; best of `repeat`."""
    import torch

    buf = torch.ones(num_bytes // 8, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        best = 0.0
        for _ in range(repeat):
            start = time.perf_counter()
            buf.sum()
            best = max(best, num_bytes / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(threads)
    return best


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    exec, so a worker would inherit its parent's peak."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1e3
    except OSError:
        return 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


# ---------------------------------------------------------------------------------------------------- workers
# A worker answers JSON lines on its own copy of stdout (fd 1 is pointed at stderr so library chatter cannot
# corrupt the protocol): {"op": "prefill"|"decode", "prompt": [...]} -> {"tok_s": x}; {"op": "stats"} -> {...}.


class StreamingRunner:
    """A runtime timed from its token stream: `_request` returns (seconds to the first token, seconds for the rest)."""

    decode_len: int

    def _request(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
        raise NotImplementedError

    def prefill(self, prompt_ids: list[int]) -> float:
        return len(prompt_ids) / self._request(prompt_ids, 1)[0]

    def decode(self, prompt_ids: list[int]) -> float:
        return (self.decode_len - 1) / self._request(prompt_ids, self.decode_len)[1]


class HearthRunner(StreamingRunner):
    name = "hearth"

    def __init__(self, model: str, opts: dict):
        from hearth.config import EngineConfig
        from hearth.engine.llm_engine import LLMEngine
        from hearth.loader.resolve import resolve_model

        config = EngineConfig(max_model_len=opts["max_model_len"], max_num_seqs=1,
                              max_num_batched_tokens=max(opts["prompt_len"], 512), enable_prefix_caching=False,
                              dtype=opts["dtype"], int8_prefill=opts.get("int8_prefill", False),
                              lm_head_int8=opts.get("lm_head_int8", False),
                              int8_weights=opts.get("int8_weights", False),
                              **opts.get("speculative", {}))  # fmt: skip
        self.engine = LLMEngine(resolve_model(model), config)
        self.vocab_size = self.engine.model_config.vocab_size
        self.decode_len = opts["decode_len"]

    def _request(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
        """(seconds to the first token, seconds for the remaining max_tokens - 1 tokens)."""
        from hearth.sampling_params import SamplingParams

        engine = self.engine
        engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), "bench")
        start = time.perf_counter()
        first = None
        while engine.has_unfinished():
            for _ in engine.step():
                if first is None:
                    first = time.perf_counter()
        return first - start, time.perf_counter() - first

    def info(self) -> dict:
        runner = self.engine.runner
        from hearth.config import kv_spec

        block_bytes = kv_spec(runner.config).block_bytes(runner.block_size, str(runner.dtype).removeprefix("torch."))
        kv = block_bytes * runner.num_kvcache_blocks
        import torch

        info = {
            "weight_bytes": weight_bytes(runner.model), "kv_cache_mb": round(kv / 1e6, 1),
            "dtype": str(runner.dtype).removeprefix("torch."), "quant": self.engine.model_info.quantization,
            "int8_prefill": self.engine.engine_config.int8_prefill,
            "lm_head_int8": self.engine.engine_config.lm_head_int8,
            "int8_weights": self.engine.engine_config.int8_weights,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        }  # fmt: skip
        if self.engine.speculator is not None:  # speculative decoding: drafts scored and kept over the whole run
            stats = self.engine.stats
            info.update(spec_draft_tokens=stats.num_draft_tokens, spec_accepted_tokens=stats.num_accepted_tokens,
                        spec_acceptance=round(stats.num_accepted_tokens / max(stats.num_draft_tokens, 1), 3))  # fmt: skip
        return info


class LlamaCppRunner(StreamingRunner):
    name = "llama.cpp"

    def __init__(self, model: str, opts: dict):
        import llama_cpp

        threads = opts["threads"]
        self.llm = llama_cpp.Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=opts["max_model_len"],
                                   n_batch=max(opts["prompt_len"], 512), verbose=False)  # fmt: skip
        self.vocab_size = self.llm.n_vocab()
        self.decode_len = opts["decode_len"]
        self.version = llama_cpp.__version__

    def _request(self, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
        self.llm.reset()  # no prefix reuse between runs
        start = time.perf_counter()
        first = None
        for n, _ in enumerate(self.llm.generate(prompt_ids, temp=0.0, reset=True), 1):
            if first is None:
                first = time.perf_counter()
            if n >= max_tokens:
                break
        return first - start, time.perf_counter() - first

    def info(self) -> dict:
        return {"version": self.version, "threads": self.llm.n_threads}


class TransformersRunner:
    """transformers' eager PyTorch on the GGUF dequantized to float32; prefill only (its decode is far slower)."""

    name = "transformers"

    def __init__(self, model: str, opts: dict):
        import torch
        import transformers

        folder = tempfile.mkdtemp(prefix="hearth-bench-")
        os.symlink(os.path.abspath(model), os.path.join(folder, "model.gguf"))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf",
                                                                       dtype=torch.float32).eval()  # fmt: skip
        self.vocab_size = self.model.config.vocab_size
        self.version = transformers.__version__

    def prefill(self, prompt_ids: list[int]) -> float:
        import torch

        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(ids, logits_to_keep=1)
            return len(prompt_ids) / (time.perf_counter() - start)

    def decode(self, prompt_ids: list[int]) -> float | None:
        return None

    def info(self) -> dict:
        import torch

        return {"version": self.version, "dtype": "float32", "threads": torch.get_num_threads()}


RUNNERS = {"hearth": HearthRunner, "llama.cpp": LlamaCppRunner, "transformers": TransformersRunner}


def worker_main(name: str, model: str, opts: dict) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if name != "llama.cpp":  # llama.cpp's resident memory is measured without torch loaded
        import torch

        torch.set_num_threads(opts["threads"])
    base_rss = rss_mb()[0]
    start = time.perf_counter()
    runner = RUNNERS[name](model, opts)
    load_s = time.perf_counter() - start
    proto.write(json.dumps({"ready": True, "vocab_size": runner.vocab_size, "load_s": round(load_s, 2),
                            "runtime_rss_mb": round(base_rss, 1)}) + "\n")  # fmt: skip
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op in ("prefill", "decode"):
            reply = {"tok_s": getattr(runner, op)(cmd["prompt"])}
        else:
            current, peak = rss_mb()
            reply = {"rss_mb": round(current, 1), "peak_rss_mb": round(peak, 1), **runner.info()}
        proto.write(json.dumps(reply) + "\n")
    return 0


class Worker:
    def __init__(self, name: str, model: str, opts: dict):
        self.name = name
        argv = [sys.executable, "-m", "hearth.bench", "--worker", name, model, json.dumps(opts)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name!r} exited with status {self.proc.wait()}")
        return json.loads(line)

    def call(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def _summary(runs: list[float]) -> dict:
    return {"median": round(statistics.median(runs), 1), "min": round(min(runs), 1), "max": round(max(runs), 1),
            "runs": [round(x, 1) for x in runs]}  # fmt: skip


def run_bench(model: str, vs: list[str] = (), prompt_len: int = 512, decode_len: int = 128, repeat: int = 3,
              dtype: str = "auto", threads: int | None = None, max_model_len: int = 2048,
              int8_prefill: bool = False, speculative: dict | None = None, lm_head_int8: bool = False,
              int8_weights: bool = False, sequential: bool | None = None) -> dict:  # fmt: skip
    """Alternate Hearth and each peer `repeat` times (after one untimed warm-up round); return the JSON record.
    `speculative`: EngineConfig's speculative-decoding fields for Hearth ({"speculative": "ngram", ...}).
    `sequential`: never two runtimes in memory at once, each round loads each anew (`_run_sequential`); None: so when
    peers are compared on a file larger than a quarter of RAM."""
    from hearth.loader.resolve import resolve_model
    from hearth.planner.hardware import ram_bytes

    ref = resolve_model(model)
    for peer in vs:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r} (choose from {', '.join(PEERS)})")
        if ref.format != "gguf":
            raise ValueError(f"--vs {peer} needs a GGUF model, got {ref.path}")
    threads = threads or int(os.environ.get("HEARTH_NUM_THREADS") or 0) or physical_cores()
    max_model_len = max(max_model_len, prompt_len + decode_len)  # a long --prompt-len must fit the context
    opts = {"prompt_len": prompt_len, "decode_len": decode_len, "dtype": dtype, "threads": threads,
            "max_model_len": max_model_len, "int8_prefill": int8_prefill, "speculative": speculative or {},
            "lm_head_int8": lm_head_int8, "int8_weights": int8_weights}  # fmt: skip
    record = {
        "bench": "latency", "git": git_rev(), "date": datetime.date.today().isoformat(),
        "device": cpu_name(), "nproc": os.cpu_count(), "threads": threads, "model": ref.name,
        "model_file_mb": round(os.path.getsize(ref.path) / 1e6, 1) if os.path.isfile(ref.path) else None,
        "prompt_len": prompt_len, "decode_len": decode_len, "repeat": repeat, "speculative": speculative or None,
    }  # fmt: skip
    record["bandwidth_probe_gb_s"] = round(memory_bandwidth(num_threads=threads), 1)  # copy: read + write
    record["read_bandwidth_gb_s"] = round(read_bandwidth(num_threads=threads), 1)
    if sequential is None:  # files that two runtimes could not hold at once
        sequential = bool(vs) and bool(record["model_file_mb"]) and record["model_file_mb"] * 1e6 > ram_bytes() / 4
    record["sequential"] = sequential
    names = ["hearth", *vs]
    paths = {"hearth": model, **{p: ref.path for p in vs}}
    if sequential:
        record.update(_run_sequential(names, paths, opts, repeat, prompt_len))
    else:
        record.update(_run_resident(names, paths, opts, repeat, prompt_len))
    hearth = record["hearth"]
    wbytes = hearth["weight_bytes"]
    if ref.format == "gguf":  # an MoE file: a token reads top-k of the experts, not all (what `hearth plan FILE` counts)
        from hearth.loader.gguf import open_gguf
        from hearth.loader.inspect import read_gguf_config
        from hearth.planner.plan import gguf_decode_bytes

        gguf = open_gguf(ref.path, check_types=False)
        wbytes = round(gguf_decode_bytes(gguf.tensor_infos, read_gguf_config(gguf)).touched())
        record["decode_bytes_per_token"] = wbytes
    record["roofline_decode_tok_s"] = round(record["read_bandwidth_gb_s"] * 1e9 / wbytes, 1)
    record["achieved_gb_s"] = round(wbytes * hearth["decode_tok_s"] / 1e9, 2)
    record["decode_vs_roofline"] = round(hearth["decode_tok_s"] / record["roofline_decode_tok_s"], 3)
    if record["model_file_mb"]:
        record["memory_target_mb"] = round(2 * record["model_file_mb"] + hearth["kv_cache_mb"], 1)
    for peer in vs:
        for op in ("prefill", "decode"):
            theirs = record[peer].get(f"{op}_tok_s")
            if theirs:
                record[f"{op}_vs_{peer}"] = round(hearth[f"{op}_tok_s"] / theirs, 2)
        # below 1: Hearth loads faster / holds less
        for key, name in (("load_s", "load_time"), ("peak_rss_mb", "peak_rss")):
            if record[peer].get(key) and hearth.get(key):
                record[f"{name}_vs_{peer}"] = round(hearth[key] / record[peer][key], 2)
    return record


def _prompt(vocab: int, prompt_len: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(100, vocab) for _ in range(prompt_len)]


def _entry(runs: dict[str, list[float]], base: dict) -> dict:
    entry = dict(base)
    for op in ("prefill", "decode"):
        if runs[op]:
            summary = _summary(runs[op])
            entry[f"{op}_tok_s"] = summary.pop("median")
            entry[f"{op}_spread"] = summary
    return entry


def _run_resident(names: list[str], paths: dict, opts: dict, repeat: int, prompt_len: int) -> dict:
    """Every runtime loaded once, side by side; each round alternates them (round 0 warms up)."""
    workers = [Worker(n, paths[n], opts) for n in names]
    out = {}
    try:
        prompt = _prompt(workers[0].ready["vocab_size"], prompt_len)
        runs = {w.name: {"prefill": [], "decode": []} for w in workers}
        for rnd in range(repeat + 1):
            for op, ids in (("prefill", prompt), ("decode", prompt[:16])):
                for w in workers:
                    tok_s = w.call(op, prompt=ids)["tok_s"]
                    if rnd and tok_s is not None:
                        runs[w.name][op].append(tok_s)
        for w in workers:
            base = {"load_s": w.ready["load_s"], "runtime_rss_mb": w.ready["runtime_rss_mb"], **w.call("stats")}
            out[w.name] = _entry(runs[w.name], base)
    finally:
        for w in workers:
            w.close()
    return out


def _run_sequential(names: list[str], paths: dict, opts: dict, repeat: int, prompt_len: int) -> dict:
    """One runtime in memory at a time: each round starts every runtime in turn in a fresh process (load, an untimed
    warm-up prefill, a timed prefill and decode, its stats) and stops it before the next one starts. Round 0 warms the
    page cache and is not kept, so `load_s` is a load from a warm page cache (the median of the kept rounds) and
    `peak_rss_mb` the largest peak of any round."""
    runs = {n: {"prefill": [], "decode": [], "load_s": []} for n in names}
    stats: dict[str, dict] = {}
    prompt: list[int] | None = None
    for rnd in range(repeat + 1):
        for name in names:
            w = Worker(name, paths[name], opts)
            try:
                prompt = prompt or _prompt(w.ready["vocab_size"], prompt_len)
                w.call("prefill", prompt=prompt[:16])  # kernels and buffers warm
                timed = {op: w.call(op, prompt=ids)["tok_s"] for op, ids in (("prefill", prompt), ("decode", prompt[:16]))}
                st = {"runtime_rss_mb": w.ready["runtime_rss_mb"], **w.call("stats")}
            finally:
                w.close()
            if not rnd:
                continue
            for op, tok_s in timed.items():
                if tok_s is not None:
                    runs[name][op].append(tok_s)
            runs[name]["load_s"].append(w.ready["load_s"])
            peak = max(stats.get(name, {}).get("peak_rss_mb", 0.0), st.get("peak_rss_mb", 0.0))
            stats[name] = {**st, "peak_rss_mb": peak}
    out = {}
    for name in names:
        loads = runs[name].pop("load_s")
        base = {"load_s": round(statistics.median(loads), 2), "load_spread": _summary(loads), **stats[name]}
        out[name] = _entry(runs[name], base)
    return out


def physical_cores() -> int:
    """Physical cores (not SMT siblings) available to this process."""
    try:
        cpus = os.sched_getaffinity(0)
        cores = set()
        for cpu in cpus:
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            with open(path + "core_id") as f, open(path + "physical_package_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        return max(len(cores), 1)
    except (OSError, AttributeError):
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    sys.exit(worker_main(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
