"""`hearth show MODEL`: architecture, parameters, quantization, context length, template, file size."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("show", help="Show model details", description="Show what a model is, without loading it.")
    p.add_argument("model", help="smollm2, a .gguf file, an HF folder, a pulled repo id or short name, or a model-card name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--load", action="store_true", help="also load the weights and report the memory they take")
    p.set_defaults(func=cmd_show)


def loaded_memory(ref) -> dict:
    """Build the tokenizer and load the weights as `serve` would (default dtype, quantized forms kept); measure them."""
    import torch

    from hearth.config import EngineConfig
    from hearth.engine.model_runner import resolve_dtype
    from hearth.loader.inspect import read_gguf_config, read_hf_config
    from hearth.loader.load import load_model, model_nbytes
    from hearth.models.registry import model_class
    from hearth.tokenizer import load_tokenizer

    config = read_gguf_config(ref.path) if ref.format == "gguf" else read_hf_config(ref.path)
    load_tokenizer(ref.path)  # as serve does, before any weight: a vocabulary serve cannot use fails here too
    dtype = resolve_dtype(EngineConfig().dtype, ref, config)
    model = model_class(config)(config)
    load_model(model, ref, dtype, keep_quantized=dtype != torch.float32)
    info = {"compute_dtype": str(dtype).removeprefix("torch."), "memory_used": model_nbytes(model)}
    fp8_mode = getattr(model, "fp8_mode", None)
    if fp8_mode:
        info["fp8_weights"] = fp8_mode
    return info


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
        if ref.format == "gguf" and "MXFP4" in info.get("quantization", {}):
            info["repack_cache"] = _repack_cache(ref.path)
        if args.load:
            info.update(loaded_memory(ref))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = []
    for key, value in info.items():
        if key == "num_parameters":
            value = _human(value)
        elif key in ("file_size", "memory_used"):
            value = _human(value, "B")
        elif isinstance(value, dict):
            value = ", ".join(f"{k}×{v}" for k, v in value.items())
        rows.append((key.replace("_", " "), value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


def _repack_cache(path: str) -> str:
    """The MXFP4 experts' repack cache (loader/repack_cache.py) for a bf16 load of this GGUF."""
    import torch

    from hearth.loader import repack_cache
    from hearth.loader.gguf import open_gguf

    g = open_gguf(path, check_types=False)
    return repack_cache.describe_cache(path, repack_cache.cache_key(g.paths, g.header_bytes(), torch.bfloat16))


def _card(name: str):
    try:
        from hearth.planner.cards import load_card
    except ImportError:
        return None
    return load_card(name)
