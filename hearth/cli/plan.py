"""`hearth plan MODEL`: will it fit, how fast, which format — on this machine or a catalogue device. No torch at
import; a GGUF file's metadata is read through hearth.loader.inspect (which may import torch), never its tensors."""

from __future__ import annotations

import json
import os
from collections import Counter


def register(sub) -> None:
    p = sub.add_parser("plan", help="Will a model fit, how fast, which format",
                       description="Estimate memory, fit and speed of a model from its config alone.")  # fmt: skip
    p.add_argument("model", nargs="?", help="a model-card name (hearth list), a .gguf file, an HF folder, or smollm2")
    p.add_argument("--hardware", default="auto", metavar="NAME", help="catalogue name (e.g. h100, rtx-4090) or auto")
    p.add_argument("--devices", type=int, default=1, metavar="N", help="N identical devices (e.g. 8 for a node)")
    p.add_argument("--context", type=int, default=None, metavar="N", help="tokens per sequence (default: ≤ 8192)")
    p.add_argument("--concurrency", type=int, default=1, metavar="C", help="sequences held at once")
    p.add_argument("--format", default=None, metavar="F", help="bf16, fp8, mxfp4, q8_0, q4_k_m, … (default: native)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-hardware", action="store_true", help="print the hardware catalogue and exit")
    p.set_defaults(func=cmd_plan)


def _model(ref: str, fmt: str | None):
    """(name, ModelConfig, real weight bytes or None, format label or None, FileBytes or None) for a card, a GGUF
    file or an HF folder."""
    from hearth.planner.cards import load_card

    card = load_card(ref)
    if card is not None:
        return card.name, card.config, None, None, None
    from hearth.loader.resolve import resolve_model

    model_ref = resolve_model(ref)
    if model_ref.format == "gguf":
        from hearth.loader.gguf import open_gguf
        from hearth.loader.inspect import read_gguf_config
        from hearth.planner.plan import gguf_decode_bytes

        g = open_gguf(model_ref.path, check_types=False)
        cfg = read_gguf_config(g)
        if fmt:
            return model_ref.name, cfg, None, None, None
        types = Counter()
        for t in g.tensor_infos:
            if len(t.shape) >= 2:
                types[t.type_name] += t.nbytes
        label = "gguf " + "+".join(name for name, _ in types.most_common(2))  # the types holding the most bytes
        return model_ref.name, cfg, sum(t.nbytes for t in g.tensor_infos), label, gguf_decode_bytes(g.tensor_infos, cfg)
    from hearth.loader.inspect import read_hf_config

    cfg = read_hf_config(model_ref.path)
    files = [os.path.join(model_ref.path, f) for f in os.listdir(model_ref.path) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(f) for f in files) or None
    return model_ref.name, cfg, None if fmt else size, None, None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def cmd_plan(args) -> int:
    from hearth.planner.hardware import CATALOGUE, get_hardware
    from hearth.planner.plan import plan

    if args.list_hardware:
        for key, hw in CATALOGUE.items():
            flops = ", ".join(f"{k} {v / 1e12:g}T" for k, v in hw.flops.items())
            print(f"{key:<12} {hw.memory_bytes / 2**30:>5.0f} GiB {hw.bandwidth / 1e12:>6.3f} TB/s  {flops:<32} "
                  f"{hw.source}")  # fmt: skip
        return 0
    if not args.model:
        from hearth.cli.main import CliError

        raise CliError("plan: give a MODEL (a card name from `hearth list`, a .gguf file or an HF folder)")
    name, cfg, real_bytes, label, file_bytes = _model(args.model, args.format)
    hw = get_hardware(args.hardware, args.devices)
    p = plan(cfg, hw, args.context, args.concurrency, args.format, model=name, weights_bytes_override=real_bytes,
             file_bytes=file_bytes)  # fmt: skip
    if label:
        p.format = label
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    prefill = f"{p.prefill_tok_s:,.0f} tok/s" if p.prefill_tok_s else "unknown (no FLOP/s for this device)"
    rows = [
        ("model", f"{p.model} ({p.architecture})"),
        ("parameters", f"{p.params_total / 1e9:.2f}B total, {p.params_active / 1e9:.2f}B active per token"),
        ("format", p.format),
        ("weights", _gb(p.weights_bytes)),
        ("KV cache", f"{p.kv_bytes_per_token / 1024:.1f} KiB/token (all layers); {_gb(p.kv_bytes_per_seq)} per "
                     f"sequence at {p.context} tokens"),
        ("memory needed", f"{_gb(p.memory_bytes)} for {p.concurrency} × {p.context} tokens"),
        *([("per device", f"weights {_gb(p.weights_bytes_per_device)}, KV cache "
                          f"{p.kv_bytes_per_token_per_device / 1024:.1f} KiB/token"
                          f"{' (MLA latent, replicated: not divided)' if cfg.kv_lora_rank else ''} "
                          f"(hearth serve -tp {p.devices})")]
          if p.devices > 1 else []),
        ("hardware", f"{p.hardware}: {_gb(p.hardware_memory_bytes)}, usable {_gb(p.usable_bytes)}"),
        ("fits", "yes" if p.fits else "NO"),
        ("max context", f"{p.max_context} tokens at concurrency {p.concurrency}"),
        ("decode", f"~{p.decode_tok_s:,.1f} tok/s per sequence ({p.decode_tok_s_total:,.1f} total)"),
        ("prefill", prefill),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    for line in p.advice:
        print(f"  - {line}")
    print("  estimates: " + "; ".join(p.assumptions))
    return 0
