"""`hearth` command line: Ollama's verbs, simonw/llm's admin groups.

Each subcommand lives in its own module under hearth/cli/ and exposes `register(subparsers)`. Modules import torch and
other heavy packages inside the command function only, so `hearth --help`, `list` and `plan` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hearth.config import ENV

# subcommand modules, in the order `hearth --help` lists them
COMMANDS = ["serve", "run", "pull", "list", "ps", "rm", "show", "plan", "bench", "keys", "audit", "usage"]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def env_epilog(names: list[str] | None = None) -> str:
    rows = [(n, d, h) for n, d, h in ENV if names is None or n in names]
    return "environment variables:\n" + "\n".join(f"  {n:<20} {h} (default: {d})" for n, d, h in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth",
        description="Run open-weight language models locally, with an OpenAI-compatible server.",
        epilog=env_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hearth.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hearth.cli.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from hearth.log import setup_logging

    setup_logging("DEBUG" if args.debug else None)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user; the traceback only with --debug
        if args.debug:
            raise
        from hearth.loader import ModelLoadError

        if isinstance(e, (CliError, ModelLoadError, ValueError, OSError)):
            print(f"hearth: error: {e}", file=sys.stderr)
        else:
            print(f"hearth: error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        logging.getLogger(__name__).debug("command failed", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
