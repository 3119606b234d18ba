"""`hearth list`: models on this machine (embedded, $HEARTH_HOME/models, the Hugging Face cache, Ollama's store,
LM Studio's folders) beside the known model cards. The NAME column is what `hearth run` / `serve` take."""

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
            found.append({"name": name, "path": path, "size": os.path.getsize(path), "format": "gguf",
                          "kind": "embedded"})  # fmt: skip
        except ModelLoadError:
            pass
    models_dir = os.path.join(hearth_home(), "models")
    if os.path.isdir(models_dir):
        for entry in sorted(os.listdir(models_dir)):
            path = os.path.join(models_dir, entry)
            if entry.endswith(".gguf") and os.path.isfile(path):
                found.append({"name": path, "path": path, "size": os.path.getsize(path), "format": "gguf",
                              "kind": "gguf"})  # fmt: skip
            elif os.path.isfile(os.path.join(path, "config.json")):
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                found.append({"name": path, "path": path, "size": size, "format": "safetensors", "kind": "hf"})
    return found + stored_models()


def stored_models() -> list[dict]:
    """Pulled models in the Hugging Face cache, then Ollama's and LM Studio's models."""
    from hearth.loader.hub import cached_repos
    from hearth.loader.stores import lmstudio_models, ollama_models

    return [{**r, "kind": "hf-cache"} for r in cached_repos()] + ollama_models() + lmstudio_models()


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}GB" if n >= 1e9 else f"{n / 1e6:.1f}MB"


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
    width = max([40, *(len(m["name"]) for m in models)])
    print(f"{'NAME':<{width}} {'SIZE':>10}  {'FORMAT':<12} SOURCE")
    for m in models:
        print(f"{m['name']:<{width}} {_size(m['size']):>10}  {m['format']:<12} {m['kind']}")
    if cards:
        print("\nmodel cards (configs only: `hearth plan NAME`, `hearth show NAME`):")
        for c in cards:
            print(f"  {c['name']:<38} {c['license']}")
    return 0
