"""`hearth show MODEL`: architecture, parameters, quantization, context length, template, file size."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("show", help="Show model details", description="Show what a model is, without loading it.")
    p.add_argument("model", help="smollm2, a .gguf file, an HF folder, or a model-card name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def cmd_show(args) -> int:
    from hearth.loader import ModelLoadError
    from hearth.loader.inspect import describe
    from hearth.loader.resolve import resolve_model

    try:
        ref = resolve_model(args.model)
    except ModelLoadError:
        card = _card(args.model)
        if card is None:
            raise
        info = {"format": "model card (no weights)", "architecture": card.config.architecture,
                "context_length": card.config.max_position_embeddings, "source": card.source,
                "license": card.license}  # fmt: skip
    else:
        info = {"model": ref.name, "path": ref.path, **describe(ref.path)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = []
    for key, value in info.items():
        if key == "num_parameters":
            value = _human(value)
        elif key == "file_size":
            value = _human(value, "B")
        elif isinstance(value, dict):
            value = ", ".join(f"{k}×{v}" for k, v in value.items())
        rows.append((key.replace("_", " "), value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


def _card(name: str):
    try:
        from hearth.planner.cards import load_card
    except ImportError:
        return None
    return load_card(name)
