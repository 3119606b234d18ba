"""`hearth list`: models on this machine (embedded, $HEARTH_HOME/models, the Hugging Face cache, Ollama's store,
LM Studio's folders) beside the known model cards. The NAME column is what `hearth run` / `serve` take."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("list", aliases=["ls"], help="List local models", description="List local models and cards.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}GB" if n >= 1e9 else f"{n / 1e6:.1f}MB"


def cmd_list(args) -> int:
    from hearth.loader.resolve import local_models

    models = local_models()
    try:
        from hearth.planner.cards import list_cards

        cards = [{"name": c.name, "license": c.license} for c in list_cards()]
    except ImportError:
        cards = []
    if args.json:
        print(json.dumps({"local": models, "cards": cards}, indent=2))
        return 0
    width = max([40, *(len(m["name"]) for m in models)])
    print(f"{'NAME':<{width}} {'SIZE':>10}  {'FORMAT':<12} SOURCE")
    for m in models:
        print(f"{m['name']:<{width}} {_size(m['size']):>10}  {m['format']:<12} {m['kind']}")
    if cards:
        print("\nmodel cards (configs only: `hearth plan NAME`, `hearth show NAME`):")
        for c in cards:
            print(f"  {c['name']:<38} {c['license']}")
    return 0
