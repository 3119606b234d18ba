"""`hearth pull REF`: download a model from the Hugging Face Hub into the standard HF cache — the one command that
uses the network, and only while it runs (serve and run stay offline and read the cache)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from hearth.cli.main import env_epilog

    p = sub.add_parser(
        "pull", help="Download a model from the Hugging Face Hub", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download a model's config, tokenizer and weights (never pickles) into the Hugging Face cache, "
        "checking each file's SHA-256 against the hub. Says first whether the model fits this machine.",
        epilog="references:\n  OWNER/NAME               a repo id (openai/gpt-oss-20b)\n  OWNER/NAME-GGUF:QUANT    "
        "one quantization of a GGUF repo (default Q4_K_M), split parts included\n  gpt-oss:20b, deepseek-r1:8b ... "
        "a short name (`hearth pull --names` lists them)\n\n"
        + env_epilog(["HEARTH_HOME"]) + "\n  HF_ENDPOINT, HF_HUB_CACHE, HF_HOME, HF_TOKEN: as for huggingface_hub",
    )  # fmt: skip
    p.add_argument("model", nargs="?", help="repo id, repo id with a quant tag, or short name")
    p.add_argument("--revision", help="branch, tag or commit to pin (default main)")
    p.add_argument("--include", nargs="+", metavar="GLOB", help="download the files matching these globs instead")
    p.add_argument("--yes", "-y", action="store_true", help="download even if it does not fit, without asking")
    p.add_argument("--names", action="store_true", help="list the short names and exit")
    p.set_defaults(func=cmd_pull)


def confirm(question: str, yes: bool, refusal: str) -> bool:
    """True with --yes; asks on a terminal; without a terminal, refuses with `refusal` (a CliError)."""
    from hearth.cli.main import CliError

    if yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise CliError(refusal)
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def cmd_pull(args) -> int:
    from hearth.cli.main import CliError
    from hearth.loader import hub

    if args.names:
        for name, short in hub.SHORT_NAMES.items():
            print(f"{name:<18} {short.repo}")
        return 0
    if not args.model:
        raise CliError("pull: give a model (a repo id, OWNER/NAME-GGUF:QUANT, or a short name: `hearth pull --names`)")
    ref = hub.parse_hub_ref(args.model)
    if ref is None:
        raise CliError(f"pull: {args.model!r} is not a repo id (OWNER/NAME[:QUANT]) or a short name "
                       "(`hearth pull --names`)")  # fmt: skip
    try:
        with hub.endpoint_only():
            return _pull(args, hub, ref)
    except hub.HubError as e:
        raise CliError(f"pull: {e}") from None


def _pull(args, hub, ref) -> int:
    plan = hub.plan_pull(ref, args.revision, args.include)
    total = sum(f.size for f in plan.files)
    n = len(plan.files)
    print(f"{ref.repo} @ {plan.commit[:12]}: {n} file{'s' if n != 1 else ''}, {hub._gb(total)}"
          + ("" if plan.missing_bytes == total else f" ({hub._gb(plan.missing_bytes)} to download)"
             if plan.missing_bytes else " (all cached; checking)"))  # fmt: skip
    for note in plan.notes:
        print(f"  {note}")
    fits, lines = hub.fit_report(plan)
    for line in lines:
        print(f"  {line}")
    sys.stdout.flush()
    hub.check_disk_space(plan)
    if fits is False and not confirm("It does not fit this machine. Download anyway?", args.yes,
                                     f"pull: {args.model} does not fit this machine (see the plan above); "
                                     "pass --yes to download it anyway"):  # fmt: skip
        print("not downloaded")
        return 1
    folder = hub.download(plan, args.revision)
    print(f"pulled {ref.repo} into {folder}")
    print(f"run it offline: hearth run {args.model}")
    return 0
