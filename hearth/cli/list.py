"""`hearth list`: models on this machine (embedded, $HEARTH_HOME/models) beside the known model cards."""

from __future__ import annotations

import json
import os


def register(sub) -> None:
    p = sub.add_parser("list", aliases=["ls"], help="List local models", description="List local models and cards.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)


def local_models() -> list[dict]:
    from hearth.config import hearth_home
    from hearth.loader import ModelLoadError
    from hearth.loader.resolve import EMBEDDED, embedded_model_path

    found = []
    for name in EMBEDDED:
        try:
            path = embedded_model_path(name)
            found.append({"name": name, "path": path, "size": os.path.getsize(path), "kind": "embedded"})
        except ModelLoadError:
            pass
    models_dir = os.path.join(hearth_home(), "models")
    if os.path.isdir(models_dir):
        for entry in sorted(os.listdir(models_dir)):
            path = os.path.join(models_dir, entry)
            if entry.endswith(".gguf") and os.path.isfile(path):
                found.append({"name": entry, "path": path, "size": os.path.getsize(path), "kind": "gguf"})
            elif os.path.isfile(os.path.join(path, "config.json")):
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                found.append({"name": entry, "path": path, "size": size, "kind": "hf"})
    return found


def cmd_list(args) -> int:
    models = local_models()
    try:
        from hearth.planner.cards import list_cards

        cards = [{"name": c.name, "license": c.license} for c in list_cards()]
    except ImportError:
        cards = []
    if args.json:
        print(json.dumps({"local": models, "cards": cards}, indent=2))
        return 0
    print(f"{'NAME':<40} {'SIZE':>10}  KIND")
    for m in models:
        print(f"{m['name']:<40} {m['size'] / 1e6:>8.1f}MB  {m['kind']}")
    if cards:
        print("\nmodel cards (configs only: `hearth plan NAME`, `hearth show NAME`):")
        for c in cards:
            print(f"  {c['name']:<38} {c['license']}")
    return 0
