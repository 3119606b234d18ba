"""Serving benchmark: N concurrent streaming clients over HTTP against Hearth and its CPU peers, in the same run.

Each client sends --requests-per-client completions one after another: fixed-seed prompts of 64–512 tokens, 128
tokens out. Reports aggregate output tok/s, time to first token p50/p99 (and every request's, sorted) and inter-token
latency p50 per server and concurrency, as JSON lines (and a PNG plot with --plot).

    python benchmarks/serving.py --concurrency 1 4 16 64 --peers llama-server llama-cpp-python --plot serving.png
    python benchmarks/serving.py --model FILE.gguf --chat --concurrency 4 --peers llama-server \
        --llama-server-arg=--jinja --llama-server-arg=--chat-template-file \
        --llama-server-arg=benchmarks/harmony_chat.jinja   # chat clients on a gpt-oss file, llama-server with 4 slots

`--chat` sends the prompts as one user message to /v1/chat/completions and counts every streamed delta (content,
reasoning or tool-call text); tokens come from the final usage chunk where the server sends one. For a GGUF without a
chat template give llama-server the one Hearth applies (benchmarks/harmony_chat.jinja for gpt-oss): its built-in
`--chat-template gpt-oss` drops the user's text (4 prompt tokens a request). On random weights the output is no valid
harmony, so Hearth's parser holds the text to the end: TTFT is then the request's time; tok/s is unaffected.

Peers (optional, never installed by the tests): `llama-cpp-python` needs the `bench` extra; `llama-server` needs a
binary (--llama-server PATH, default .bench/llama-server, built by benchmarks/build_llama_server.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    model: str
    proc: subprocess.Popen | None = None
    log: str = ""

    def start(self, timeout: float = 600) -> None:
        self.log = os.path.join(ROOT, ".bench", f"{self.name}.log")
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:  # ready: /health answers 200 (Hearth, llama-server), or /v1/models where there is no /health
                r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                if r.status_code == 404:
                    r = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def make_servers(args, model_path: str, concurrency: int) -> dict[str, Server]:
    ctx = 1024
    servers = {}
    port = free_port()
    servers["hearth"] = Server("hearth", [os.path.join(os.path.dirname(sys.executable), "hearth"), "serve",
                                          args.model, "--port", str(port), "--max-num-seqs", str(max(concurrency, 1)),
                                          "--max-model-len", str(ctx), "--served-model-name", "hearth",
                                          *args.hearth_args], port, "hearth")  # fmt: skip
    if "llama-cpp-python" in args.peers:
        port = free_port()
        servers["llama-cpp-python"] = Server("llama-cpp-python", [
            sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--n_ctx", str(ctx), "--port", str(port),
            "--interrupt_requests", "False"], port, model_path)  # fmt: skip
    if "llama-server" in args.peers and os.path.isfile(args.llama_server):
        port = free_port()
        servers["llama-server"] = Server("llama-server", [
            args.llama_server, "-m", model_path, "-t", str(args.threads), "-np", str(concurrency),
            "-c", str(ctx * concurrency), "--port", str(port), "--host", "127.0.0.1", *args.llama_server_args],
            port, "model")  # fmt: skip
    return servers


def make_prompts(tokenizer, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 9000)) if w.strip().isalpha()]
    prompts = []
    for _ in range(n):
        target = rng.randint(64, 512)
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer.encode(" " + rng.choice(words).strip(), add_special_tokens=False)
        prompts.append(tokenizer.decode(ids[:target]))
    return prompts


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


def delta_text(choice: dict) -> str:
    """The text a streamed choice carries: a completion's `text`, or a chat delta's content, reasoning or tool call."""
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    calls = "".join(json.dumps(c.get("function", {})) for c in delta.get("tool_calls") or [])
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "") + calls


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int, result: Result,
                      chat: bool = False) -> None:  # fmt: skip
    body = {"model": server.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", f"http://127.0.0.1:{server.port}{path}", json=body) as r:
            if r.status_code != 200:
                result.errors += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
                if not any(delta_text(c) for c in data.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft.append(now - start)
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
    except httpx.HTTPError:
        result.errors += 1
        return
    result.tokens += usage_tokens if usage_tokens else chunks


async def run_load(server: Server, prompts: list[str], concurrency: int, per_client: int, max_tokens: int,
                   chat: bool = False) -> dict:  # fmt: skip
    result = Result()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def user(k: int) -> None:
            for j in range(per_client):
                prompt = prompts[(k * per_client + j) % len(prompts)]
                await one_request(client, server, prompt, max_tokens, result, chat)

        start = time.perf_counter()
        await asyncio.gather(*(user(k) for k in range(concurrency)))
        wall = time.perf_counter() - start

    def pct(xs: list[float], q: float) -> float | None:
        return round(statistics.quantiles(xs, n=100)[int(q) - 1], 3) if len(xs) >= 2 else (round(xs[0], 3) if xs
                                                                                           else None)  # fmt: skip

    return {"server": server.name, "concurrency": concurrency, "requests": concurrency * per_client,
            "output_tok_s": round(result.tokens / wall, 1), "ttft_p50_s": pct(result.ttft, 50),
            "ttft_p99_s": pct(result.ttft, 99), "itl_p50_ms": round(1000 * statistics.median(result.itl), 1)
            if result.itl else None, "errors": result.errors, "wall_s": round(wall, 1),
            "ttft_s": sorted(round(t, 3) for t in result.ttft)}  # fmt: skip


def plot(rows: list[dict], path: str, title: str = "SmolLM2-135M Q4_1, 2 CPU threads, 128 tokens out") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["server"] for r in rows}):
        mine = sorted((r for r in rows if r["server"] == name), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        ax1.plot(xs, [r["output_tok_s"] for r in mine], marker="o", label=name)
        ax2.plot(xs, [r["ttft_p50_s"] for r in mine], marker="o", label=name)
    for ax, title in ((ax1, "aggregate output tok/s"), (ax2, "time to first token p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="*", default=["llama-server", "llama-cpp-python"])
    parser.add_argument("--llama-server", default=os.path.join(ROOT, ".bench", "llama-server"))
    parser.add_argument(
        "--max-serial-concurrency",
        type=int,
        default=16,
        help="skip llama-cpp-python (one request at a time) above this concurrency",
    )
    parser.add_argument("--hearth-arg", action="append", default=[], dest="hearth_args", metavar="ARG",
                        help="an extra `hearth serve` option, repeatable: --hearth-arg=--scheduling-policy=shortest "
                             "--hearth-arg=--int8-prefill")  # fmt: skip
    parser.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        dest="llama_server_args",
        metavar="ARG",
        help="an extra llama-server option, repeatable: --llama-server-arg=--jinja",
    )
    parser.add_argument("--chat", action="store_true", help="chat clients (/v1/chat/completions) instead of completions")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--plot", help="write a PNG of tok/s and TTFT against concurrency")
    args = parser.parse_args(argv)

    from hearth.loader.resolve import resolve_model
    from hearth.tokenizer import load_tokenizer

    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref.path)
    prompts = make_prompts(tokenizer, 256, seed=0)
    rows = []
    for concurrency in args.concurrency:
        servers = make_servers(args, ref.path, concurrency)
        for name, server in servers.items():
            if name == "llama-cpp-python" and concurrency > args.max_serial_concurrency:
                continue
            try:
                server.start()
                asyncio.run(run_load(server, prompts[:4], 1, 1, 8, args.chat))  # warm-up
                row = asyncio.run(run_load(server, prompts, concurrency, args.requests_per_client, args.max_tokens,
                                           args.chat))  # fmt: skip
            finally:
                server.stop()
            rows.append(row)
            extra = {"hearth_args": args.hearth_args} if name == "hearth" and args.hearth_args else {}
            extra |= {"llama_server_args": args.llama_server_args} if name == "llama-server" and args.llama_server_args else {}
            extra |= {"api": "chat"} if args.chat else {}
            line = json.dumps({"bench": "serving", "model": args.model, "threads": args.threads, **extra, **row})
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    if args.plot:
        title = None if args.model == "smollm2" else f"{os.path.basename(args.model)}, {args.threads} CPU threads"
        plot(rows, args.plot, *([title] if title else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
