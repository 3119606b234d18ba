"""`hearth serve [MODEL]`: the OpenAI-compatible server (uvicorn) over AsyncEngines.

It serves every model `hearth list` shows, by name, each loaded on the first request that names it and unloaded after
--keep-alive idle or when another needs the memory (hearth/api/models.py). MODEL, when given, is preloaded as the
default (requests without a model go to it) and stays loaded; with --only it is the one model served. The server
listens at once and loads MODEL in the background, so /health answers 503 "loading" until it is ready.

It binds 127.0.0.1; any other address needs API keys (`hearth keys create`) or --insecure-no-auth. At start it installs
the offline guard (no outbound connections; --allow-network lifts it) and opens the audit log. If the default model's
engine thread dies, the server shuts down and the command exits with status 1, for a supervisor to restart it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import shlex
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # what `hearth serve --only` serves when no MODEL is given


def register(sub) -> None:
    from hearth.cli.main import env_epilog
    from hearth.config import SCHEDULING_POLICIES

    p = sub.add_parser(
        "serve", help="Start the OpenAI-compatible server", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the local models under the OpenAI API (/v1/chat/completions, /v1/completions, /v1/responses, "
        "/v1/models, /health, /metrics, /api/ps) and Anthropic's (/v1/messages): each loads on the first request naming "
        "it. Listens on 127.0.0.1 only unless told otherwise.",
        epilog="examples:\n  hearth serve\n  hearth serve smollm2 --keep-alive 30m\n"
        "  hearth serve ./model.gguf --only --port 8080 --served-model-name my-model\n\n"
        "  hearth serve --host 0.0.0.0   (after `hearth keys create --name NAME`)\n\n"
        + env_epilog(["HEARTH_HOME", "HEARTH_NUM_THREADS", "HEARTH_LOG_LEVEL"]),
    )  # fmt: skip
    p.add_argument("model", nargs="?", help="a model to preload as the default: a name from `hearth list`, a .gguf file "
                   "or an HF folder (default: none; every local model loads on its first request)")  # fmt: skip
    p.add_argument("--only", action="store_true",
                   help=f"serve MODEL alone (default {DEFAULT_MODEL}), not the other local models")  # fmt: skip
    p.add_argument("--keep-alive", default="5m",
                   help="how long a model stays loaded after its last request: seconds or a duration such as 10m or "
                        "1h; 0 unloads at once, -1 never (default 5m; a request's keep_alive overrides it)")  # fmt: skip
    p.add_argument("--max-memory",
                   help="memory the loaded models may hold together (weights + KV cache, as planned): a size such as "
                        "24GiB, or a fraction of RAM (< 1); least recently used models are unloaded to stay within "
                        "it (default 0.75 of RAM)")  # fmt: skip
    p.add_argument("--load-timeout", type=float, default=120.0,
                   help="seconds a request waits for its model to load before a 503 (default 120)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="model id clients use (default: the model reference)")
    p.add_argument("--max-model-len", type=int, help="context length to allocate (default: the model's, capped)")
    p.add_argument("--max-num-seqs", type=int, help="most requests decoded together (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget per engine step (default 512)")
    p.add_argument("--int8-prefill", action="store_true", default=None,
                   help="prefill GGUF weights with int8 activations, as llama.cpp does and as decode already does: "
                        "faster prefill, a little less exact than bf16 activations")  # fmt: skip
    p.add_argument(
        "--lm-head-int8",
        action="store_true",
        default=None,
        help="hold a bf16 LM head (gpt-oss's) as Q8_0: half its bytes per decoded token, a small logit error",
    )
    p.add_argument("--int8-weights", action="store_true", default=None,
                   help="hold every dense bf16 projection (attention, LM head; gpt-oss's) as Q8_0: fewer bytes per "
                        "decoded token, a small logit error (implies --lm-head-int8)")  # fmt: skip
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES,
                   help="which waiting request starts first: fcfs (arrival order, the default) or shortest (fewest "
                        "prompt tokens; waiting earns credit, so long prompts are delayed a few steps at most)")  # fmt: skip
    p.add_argument("--admission-wait-ms", type=float,
                   help="after a request finishes, while prompts wait to be prefilled, wait up to this long for new "
                        "requests to join the next (long) step (default 20; 0: never wait)")  # fmt: skip
    add_speculative_args(p)
    p.add_argument(
        "--kv-cache-memory", help="KV cache: GiB (a number >= 1), a fraction of free memory (< 1), or a size such as 512MiB"
    )
    p.add_argument(
        "--reasoning-parser",
        choices=["think", "harmony"],
        help="how to split reasoning from the answer (default: chosen from the model)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=["deepseek_v3", "hermes"],
        help="how to read tool calls from the output (default: chosen from the chat template)",
    )
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available; default auto)")
    p.add_argument("--max-request-bytes", type=int, help="largest request body accepted (default 4 MiB)")
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host with no authentication: anyone who can reach it may use it",
    )
    p.add_argument("--require-key", action="store_true",
                   help="require an API key even on 127.0.0.1 (on by itself once any key exists)")  # fmt: skip
    p.add_argument("--allow-network", action="store_true",
                   help="lift the offline guard that refuses outbound (non-loopback) connections")  # fmt: skip
    p.add_argument("--sandbox", action="store_true",
                   help="Linux: let the kernel keep the process off the network (a network namespace of its own; "
                        "native code included); the API stays reachable. Fails rather than serve without it")  # fmt: skip
    p.add_argument("--transcripts", action="store_true", help="keep request and response bodies, encrypted, beside "
                   "the audit log (off by default: the log holds counts only)")  # fmt: skip
    p.add_argument("--no-store", action="store_true", help="keep no /v1/responses (by default a response whose "
                   "request has store true, OpenAI's default, is kept with its conversation in $HEARTH_HOME/responses.db "
                   "for previous_response_id)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", dest="cors_origins",
                   help="let web pages from ORIGIN call the API (repeatable; default: none)")  # fmt: skip
    add_parallel_args(p)
    p.add_argument("--headless", action="store_true",
                   help="a node other than the first (--node-rank > 0): run this node's tensor-parallel ranks, serve "
                        "no API")  # fmt: skip
    p.set_defaults(func=cmd_serve)


PARALLEL_FIELDS = (
    "tensor_parallel_size",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "distributed_timeout_s",
    "enable_expert_parallel",
)


def add_parallel_args(p) -> None:
    """The tensor-parallel flags `hearth serve` and `hearth run` share."""
    g = p.add_argument_group("tensor parallel")
    g.add_argument("-tp", "--tensor-parallel-size", type=int,
                   help="split the model over this many processes (ranks), in all nodes (default 1)")  # fmt: skip
    g.add_argument("--nnodes", type=int, help="machines the ranks are spread over (default 1)")
    g.add_argument("--node-rank", type=int, help="this machine's place among them (0: the one that serves)")
    g.add_argument("--master-addr", help="address where node 0 listens for the others (default 127.0.0.1)")
    g.add_argument("--master-port", type=int, help="its port (default: a free one; required with --nnodes)")
    g.add_argument("--distributed-timeout", type=float, dest="distributed_timeout_s",
                   help="seconds a rank may take to answer before the server stops (default 120)")  # fmt: skip
    g.add_argument("--enable-expert-parallel", action="store_true", default=None,
                   help="MoE models (gpt-oss): each rank holds 1/N of the experts whole (needed at -tp > 1)")  # fmt: skip


def parallel_args(args) -> dict:
    return {name: getattr(args, name) for name in PARALLEL_FIELDS if getattr(args, name, None) is not None}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


def base_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def curl_example(url: str, model: str, with_key: bool = False) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    auth = ' -H "Authorization: Bearer $HEARTH_API_KEY"' if with_key else ""
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


def build_app(
    ref,
    engine_config,
    *,
    device: str = "cpu",
    served_model_name: str | None = None,
    max_body_bytes: int | None = None,
    reasoning_parser: str | None = None,
    tool_parser: str | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    keys=None,
    audit=None,
    ledger=None,
    require_key: bool = False,
    cors_origins: list[str] | None = None,
    responses_store=None,
    models=None,
):
    """The app `hearth serve` runs: tokenizer and template now, the engine loading in the background once the app
    starts (with the same tokenizer). Returns (app, engine). `ref` None: no default model (needs `models`, a
    ModelRegistry, whose models then load on demand); engine is then None.
    """
    from hearth.api.app import create_app
    from hearth.api.errors import DEFAULT_MAX_BODY_BYTES
    from hearth.chat.template import load_chat_template
    from hearth.engine.loading import LoadingEngine
    from hearth.tokenizer import load_tokenizer

    if ref is None:
        app = create_app(None, None, None, None, max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES, keys=keys,
                         audit=audit, require_key=require_key, cors_origins=cors_origins, ledger=ledger,
                         models=models)  # fmt: skip
        return app, None
    tokenizer = load_tokenizer(ref.path)
    template = load_chat_template(tokenizer)

    def load():
        from hearth.engine.async_engine import AsyncEngine

        return AsyncEngine.from_model(ref, engine_config, device=device, tokenizer=tokenizer)

    engine = LoadingEngine(load, on_failure)
    app = create_app(engine, tokenizer, template, served_model_name or ref.name,
                     max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES, reasoning_parser=reasoning_parser,
                     tool_parser=tool_parser, keys=keys, audit=audit, require_key=require_key,
                     cors_origins=cors_origins, ledger=ledger, models=models,
                     responses_store=responses_store)  # fmt: skip
    if models is not None and models.source is not None:  # the default's memory counts against the budget too
        with contextlib.suppress(Exception):  # a model that cannot be planned fails its load, with the reason
            models.entry(served_model_name or ref.name).size = models.source.estimate(ref)
    return app, engine


def cmd_serve(args) -> int:
    from hearth.cli.main import CliError
    from hearth.governance.keys import KeyStore, keys_path
    from hearth.governance.offline import current_guard, install_offline_guard

    keys = KeyStore()
    has_keys = keys.has_keys()  # then every route but the public ones needs a key
    if not is_loopback(args.host) and not has_keys and not args.insecure_no_auth:
        raise CliError(f"refusing to listen on {args.host} without API keys: create one with `hearth keys create "
                       "--name NAME`, use --host 127.0.0.1, or pass --insecure-no-auth to let anyone who can reach "
                       "it use it")  # fmt: skip
    if args.require_key and not keys.has_active_keys():
        raise CliError(f"--require-key, but {keys_path()} holds no active key: create one with `hearth keys create "
                       "--name NAME`")  # fmt: skip
    if args.sandbox and args.allow_network:
        raise CliError("--sandbox keeps the process off the network; it cannot be combined with --allow-network")
    installed_guard = current_guard() is None
    guard = install_offline_guard(allow_network=args.allow_network)
    try:
        if args.sandbox:  # before the model loads: the sandbox needs a single-threaded process
            from hearth.governance.sandbox import sandboxed_listener

            args.sandbox_socket = sandboxed_listener(args.host, args.port)
        return _serve(args, keys, has_keys)
    finally:
        if installed_guard:
            guard.uninstall()


SPECULATIVE_NAMES = ("speculative", "num_speculative_tokens", "draft_model", "speculative_max_batch")


def add_speculative_args(p) -> None:
    """The speculative-decoding flags `serve`, `run` and `bench` share (EngineConfig's fields of the same names)."""
    p.add_argument("--speculative", choices=["ngram", "draft", "mtp"],
                   help="speculative decoding: ngram (prompt lookup: drafts copied from the prompt and output; pays off "
                        "when answers repeat their input), draft (a smaller model, --draft-model) or mtp (DeepSeek-V3/R1's "
                        "multi-token-prediction layer, from the model's checkpoint)")  # fmt: skip
    p.add_argument("--num-speculative-tokens", type=int, help="most draft tokens per step and sequence (default 4)")
    p.add_argument("--draft-model", help="draft model for --speculative draft (same tokenizer as the model)")
    p.add_argument("--speculative-max-batch", type=int,
                   help="no drafts in a step where more sequences decode than this (default 2)")  # fmt: skip


def speculative_kwargs(args) -> dict:
    return {name: getattr(args, name) for name in SPECULATIVE_NAMES if getattr(args, name, None) is not None}


def _serve(args, keys, has_keys: bool) -> int:
    import uvicorn

    from hearth.api.models import LocalModels, ModelRegistry, default_budget_bytes, parse_keep_alive
    from hearth.cli.main import CliError
    from hearth.config import EngineConfig, kv_budget_bytes
    from hearth.governance.audit import AuditLog
    from hearth.loader.resolve import resolve_model

    model = args.model or (DEFAULT_MODEL if args.only else None)
    ref = resolve_model(model) if model is not None else None
    try:
        keep_alive = parse_keep_alive(args.keep_alive)
    except ValueError as e:
        raise CliError(f"--keep-alive: {e}") from None
    names = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "dtype", "scheduling_policy",
             "int8_prefill", "lm_head_int8", "int8_weights", "admission_wait_ms")  # fmt: skip
    engine_config = EngineConfig(**{name: getattr(args, name) for name in names if getattr(args, name) is not None},
                                 **speculative_kwargs(args), **parallel_args(args))  # fmt: skip
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from hearth.engine import parallel

    if parallel.torchrun_rank() is not None:
        engine_config = parallel.torchrun_config(engine_config)
    if args.headless or (parallel.torchrun_rank() or 0) > 0:
        if ref is None:
            raise CliError("--headless runs a model's tensor-parallel ranks: name the MODEL")
        if engine_config.tensor_parallel_size == 1 or (engine_config.node_rank == 0 and parallel.torchrun_rank() is None):
            raise CliError("--headless runs the ranks of a node other than the first: give --tensor-parallel-size, "
                           "--nnodes, --node-rank (> 0), --master-addr and --master-port")  # fmt: skip
        print(f"Hearth: node {engine_config.node_rank}'s tensor-parallel ranks of {ref.name} (headless; the API is "
              f"served by node 0 at {engine_config.master_addr})")  # fmt: skip
        sys.stdout.flush()
        parallel.run_headless(ref, engine_config, device)
        return 0
    if args.served_model_name and ref is None:
        raise CliError("--served-model-name names the preloaded MODEL; give one")
    name = (args.served_model_name or ref.name) if ref is not None else None
    models = None
    if not args.only:
        budget = default_budget_bytes(device)
        if args.max_memory is not None:
            try:
                budget = kv_budget_bytes(args.max_memory, budget * 4 // 3)
            except ValueError:
                raise CliError(f"--max-memory: cannot read {args.max_memory!r} (try 24GiB, 512MiB or 0.5)") from None
        models = ModelRegistry(LocalModels(engine_config, device), keep_alive=keep_alive, budget_bytes=budget,
                               load_timeout=args.load_timeout)  # fmt: skip
    server: uvicorn.Server | None = None

    failures: list[BaseException] = []

    def on_failure(e: BaseException) -> None:
        failures.append(e)
        if server is not None:
            server.should_exit = True

    from hearth.accounting.usage import UsageLedger

    audit = AuditLog(transcripts=args.transcripts)
    ledger = UsageLedger()
    responses_store = None
    if not args.no_store:
        from hearth.api.response_store import ResponseStore

        responses_store = ResponseStore()
    app, engine = build_app(ref, engine_config, device=device, served_model_name=name,
                            max_body_bytes=args.max_request_bytes, reasoning_parser=args.reasoning_parser,
                            tool_parser=args.tool_call_parser, on_failure=on_failure, keys=keys, audit=audit,
                            ledger=ledger, responses_store=responses_store,
                            require_key=args.require_key, cors_origins=args.cors_origins, models=models)  # fmt: skip
    if not is_loopback(args.host) and not has_keys:
        logger.warning("listening on %s WITHOUT authentication (--insecure-no-auth): anyone who can reach this "
                       "address can use the model", args.host)  # fmt: skip
    url = base_url(args.host, args.port)
    if name is None:
        print(f"Hearth is serving the local models at {url} (OpenAI API at {url}/v1; each loads on its first request, "
              f"`hearth list` names them, `hearth ps` shows the loaded ones)")  # fmt: skip
    elif models is None:
        print(f"Hearth is serving {name} at {url} (OpenAI API at {url}/v1; loading the model, /health says when ready)")
    else:
        print(f"Hearth is serving {name} and the other local models at {url} (OpenAI API at {url}/v1; loading {name}, "
              "/health says when ready; the others load on their first request)")  # fmt: skip
    print(f"Chat in your browser: {url}/")
    if args.allow_network:
        print("Network: outbound connections allowed (--allow-network)")
    else:
        print("Offline: outbound connections are refused in-process (--allow-network lifts this)")
    if args.sandbox:
        print("Sandbox: the process has a network namespace of its own; nothing in it can reach the network")
    auth = "required" if has_keys or args.require_key else "not required (no keys; `hearth keys create` adds one)"
    print(f"API keys: {auth}; audit log: {audit.path}" + (" (with encrypted transcripts)" if args.transcripts else ""))
    print("Responses store: " + (f"{responses_store.path} (POST /v1/responses with store true; --no-store turns it off)"
                                 if responses_store is not None else "off (--no-store)"))  # fmt: skip
    print("Try:")
    print(f"  {curl_example(url, name or DEFAULT_MODEL, has_keys or args.require_key)}")
    sys.stdout.flush()
    from hearth.api.errors import http_protocol

    # loop="asyncio": uvloop, when installed, resolves and connects in C, out of the offline guard's sight
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, loop="asyncio", http=http_protocol())  # fmt: skip
    server = uvicorn.Server(config)
    if args.sandbox:  # bound before the sandbox, in the host's network namespace
        server.run(sockets=[args.sandbox_socket])
    else:
        server.run()
    if engine is None:
        return 0
    if engine.state == "failed":
        raise CliError(f"could not load {model}; see the log above")
    if engine.state == "dead":
        cause = f": {str(failures[0]).splitlines()[0]}" if failures and str(failures[0]) else ""
        raise CliError(f"the engine stopped after an internal error{cause} (see the log above); exiting so that a "
                       "supervisor can restart the server")  # fmt: skip
    return 0
