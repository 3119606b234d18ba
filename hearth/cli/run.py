"""`hearth run MODEL [PROMPT]`: chat in the terminal, streaming tokens; interactive when no prompt is given."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from hearth.cli.main import env_epilog

    p = sub.add_parser(
        "run", help="Run a model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a model in the terminal. With a PROMPT, answer it and exit; without one, start an "
        "interactive chat (/bye or Ctrl-D to leave, Ctrl-C stops the current answer).",
        epilog="examples:\n  hearth run smollm2 \"What is the capital of France?\" --temperature 0\n  hearth run "
        "smollm2\n\n" + env_epilog(["HEARTH_HOME", "HEARTH_NUM_THREADS"]),
    )  # fmt: skip
    p.add_argument("model", help="smollm2, a .gguf file, an HF folder")
    p.add_argument("prompt", nargs="?", help="one prompt to answer (omit for an interactive chat)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length to allocate (default 4096)")
    p.add_argument("--verbose", action="store_true", help="print timings after each answer (stderr)")
    p.set_defaults(func=cmd_run)


def stream_answer(engine, prompt_ids: list[int], params, out=sys.stdout) -> str:
    """Generate one answer, printing text as it comes; Ctrl-C aborts it. Returns the text."""
    request_id = "cli"
    engine.add_request(prompt_ids, params, request_id)
    text = ""
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                out.write(delta.text)
                out.flush()
                text += delta.text
    except KeyboardInterrupt:
        engine.abort(request_id)
        out.write("\n[stopped]")
    out.write("\n")
    out.flush()
    return text


def cmd_run(args) -> int:
    import time

    from hearth.chat.template import load_chat_template
    from hearth.config import EngineConfig
    from hearth.engine.llm_engine import LLMEngine
    from hearth.loader.resolve import resolve_model
    from hearth.sampling_params import SamplingParams

    ref = resolve_model(args.model)
    engine = LLMEngine(ref, EngineConfig(max_model_len=args.max_model_len, max_num_seqs=1))
    tokenizer = engine.tokenizer
    template = load_chat_template(tokenizer)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(user_text: str) -> None:
        messages.append({"role": "user", "content": user_text})
        prompt = template.render(messages, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        start = time.perf_counter()
        text = stream_answer(engine, ids, params)
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
