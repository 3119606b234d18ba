"""`hearth run MODEL [PROMPT]`: chat in the terminal, streaming tokens; interactive when no prompt is given."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap


def register(sub) -> None:
    from hearth.cli.main import env_epilog
    from hearth.cli.serve import add_speculative_args

    p = sub.add_parser(
        "run", help="Run a model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a model in the terminal. With a PROMPT, answer it and exit; without one, start an "
        "interactive chat (/bye or Ctrl-D to leave, Ctrl-C stops the current answer).",
        epilog="examples:\n  hearth run smollm2 \"What is the capital of France?\" --temperature 0\n  hearth run "
        "smollm2\n\n" + env_epilog(["HEARTH_HOME", "HEARTH_NUM_THREADS"]),
    )  # fmt: skip
    p.add_argument("model", help="smollm2, a .gguf file, an HF folder, a pulled repo id or short name (hearth list)")
    p.add_argument("prompt", nargs="?", help="one prompt to answer (omit for an interactive chat)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--max-model-len", type=int, help="context length to allocate (default: the model's, at most 8192 "
                   "and what the KV budget holds)")  # fmt: skip
    add_speculative_args(p)
    p.add_argument("--verbose", action="store_true", help="print timings after each answer (stderr)")
    p.add_argument("--allow-network", action="store_true",
                   help="lift the offline guard that refuses outbound (non-loopback) connections")  # fmt: skip
    p.add_argument("--sandbox", action="store_true",
                   help="Linux: let the kernel keep the process off the network (a network namespace of its own; "
                        "native code included). Fails rather than run without it")  # fmt: skip
    from hearth.cli.serve import add_parallel_args

    add_parallel_args(p)
    p.set_defaults(func=cmd_run)


DIM, RESET = "\033[2m", "\033[0m"


def tool_call_text(call) -> str:
    """A tool call as a labelled block: its name, then its arguments pretty-printed (as sent when not JSON)."""
    try:
        arguments = json.dumps(json.loads(call.arguments), indent=2, ensure_ascii=False)
    except ValueError:
        arguments = call.arguments
    return f"\n[tool call] {call.name}\n{textwrap.indent(arguments, '  ')}\n"


def stream_answer(engine, prompt_ids: list[int], params, parser=None, out=None) -> str:
    """Generate one answer, printing text as it comes (reasoning dimmed, apart from the answer; tool calls the model
    makes as labelled blocks, `tool_call_text`); Ctrl-C aborts it. Returns the answer text."""
    out = out or sys.stdout  # looked up now: sys.stdout may have been replaced since import
    request_id = "cli"
    engine.add_request(prompt_ids, params, request_id)
    color = out.isatty()
    answer, in_reasoning = "", False

    def show(parsed) -> None:
        nonlocal answer, in_reasoning
        if parsed.reasoning:
            if not in_reasoning:
                out.write((DIM if color else "") + "Thinking: ")
                in_reasoning = True
            out.write(parsed.reasoning)
        text = parsed.content + "".join(tool_call_text(c) for c in parsed.tool_calls)
        if text:
            if in_reasoning:
                out.write((RESET if color else "") + "\n\n")
                in_reasoning = False
            out.write(text)
            answer += parsed.content
        out.flush()

    try:
        while engine.has_unfinished():
            for delta in engine.step():
                if delta.error is not None:
                    raise delta.error  # the engine failed this answer (logged); main prints it as one line
                if parser is None:
                    out.write(delta.text)
                    out.flush()
                    answer += delta.text
                    continue
                show(parser.feed(delta.text))
                if delta.finished:
                    show(parser.finish())
    except KeyboardInterrupt:
        engine.abort(request_id)
        out.write("\n[stopped]")
    out.write((RESET if color and in_reasoning else "") + "\n")
    out.flush()
    return answer


def cmd_run(args) -> int:
    from hearth.cli.main import CliError
    from hearth.governance.offline import current_guard, install_offline_guard

    if args.sandbox and args.allow_network:
        raise CliError("--sandbox keeps the process off the network; it cannot be combined with --allow-network")
    installed_guard = current_guard() is None
    guard = install_offline_guard(allow_network=args.allow_network)
    try:
        if args.sandbox:  # before the model loads: the sandbox needs a single-threaded process
            from hearth.governance.sandbox import enter_sandbox

            enter_sandbox()
        return _run(args)
    finally:
        if installed_guard:
            guard.uninstall()


def _run(args) -> int:
    from hearth.cli.serve import parallel_args, speculative_kwargs
    from hearth.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine
    from hearth.loader.resolve import resolve_model

    ref = resolve_model(args.model)
    engine = LLMEngine(ref, EngineConfig(max_model_len=args.max_model_len, max_num_seqs=1, **parallel_args(args),
                                         **speculative_kwargs(args)))  # max_model_len None: sized to fit  # fmt: skip
    try:
        return _chat(args, engine)
    finally:
        engine.close()  # the other tensor-parallel ranks, if any


def _chat(args, engine) -> int:
    import time

    from hearth.chat.format import chat_format
    from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate, load_chat_template
    from hearth.sampling_params import SamplingParams

    tokenizer = engine.tokenizer
    template = load_chat_template(tokenizer)
    if template is None:  # a file without its own template: ChatML, as the server does
        template = ChatTemplate(CHATML_TEMPLATE, tokenizer.bos_token or "", tokenizer.eos_token or "")
    fmt = chat_format(tokenizer, template, engine.model_config.architecture)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop_token_ids=fmt.stop_token_ids,
        skip_special_tokens=fmt.skip_special_tokens,
    )
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(user_text: str) -> None:
        messages.append({"role": "user", "content": user_text})
        ids = fmt.render(tokenizer, messages)
        start = time.perf_counter()
        text = stream_answer(engine, ids, params, fmt.parser(with_tools=False))
        if args.verbose:
            n = len(tokenizer.encode(text, add_special_tokens=False))
            print(f"[{n} tokens in {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": text})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/bye", "/exit"):
            break
        if line.strip():
            answer(line)
    return 0
