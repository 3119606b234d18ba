"""`hearth rm REF`: remove a pulled model (every cached revision of its repo) from the Hugging Face cache."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("rm", help="Remove a pulled model from the Hugging Face cache",
                       description="Remove a model's repo (all revisions) from the Hugging Face cache. Models in "
                       "Ollama's store or LM Studio's folders are theirs to remove.")  # fmt: skip
    p.add_argument("model", help="repo id or short name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.set_defaults(func=cmd_rm)


def cmd_rm(args) -> int:
    from hearth.cli.main import CliError
    from hearth.cli.pull import confirm
    from hearth.loader import hub

    if args.model.startswith(("ollama:", "lmstudio:")):
        tool = "ollama rm" if args.model.startswith("ollama:") else "LM Studio"
        raise CliError(f"rm: {args.model} is not Hearth's to remove (use {tool})")
    ref = hub.parse_hub_ref(args.model)
    if ref is None:
        raise CliError(f"rm: {args.model!r} is not a repo id or a short name")
    if ref.tag:
        raise CliError(f"rm: removes whole repos; give {ref.repo} (without :{ref.tag})")
    try:
        freed = hub.remove_repo(ref.repo, lambda q: confirm(q, args.yes, f"rm: pass --yes to remove {ref.repo}"))
    except hub.HubError as e:
        raise CliError(f"rm: {e}") from None
    if not freed:
        print("nothing removed")
    return 0
