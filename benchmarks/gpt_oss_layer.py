"""gpt-oss-20b decode cost per layer: random weights with the real per-layer shapes, MXFP4 experts, bf16 elsewhere.

Runs 2 layers through Hearth's model code on a paged KV cache at batch 1 and batch 8, and sets the time against this
machine's roofline: bytes a decode step must read (attention weights, router, the experts actually hit, KV) divided
by the bandwidth measured in the same run with a numpy copy. Prints one JSON object. Not part of the test suite.

    python benchmarks/gpt_oss_layer.py [--layers 2] [--context 128] [--steps 5] [--out file.jsonl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import numpy as np
import torch

from hearth.config import ModelConfig, kv_spec
from hearth.layers.context import Context, reset_context, set_context
from hearth.models.gpt_oss import GptOssForCausalLM

REAL_20B = dict(
    model_type="gpt_oss", vocab_size=1024, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
    num_attention_heads=64, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=150000.0,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096},
    max_position_embeddings=4096, attention_bias=True, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
)  # fmt: skip


def measure_bandwidth(num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a numpy copy (read + write counted), best of `repeats`."""
    src = np.ones(num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def build(num_layers: int) -> GptOssForCausalLM:
    config = ModelConfig(**{**REAL_20B, "num_hidden_layers": num_layers})
    config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    model = GptOssForCausalLM(config)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    for module in model.modules():
        if module.__class__.__name__ == "Linear":
            module.weight = rand(module.out_features, module.in_features)
            module.bias = rand(module.out_features) if module.has_bias else None
        elif module.__class__.__name__ == "Embedding":
            module.weight = rand(module.num_embeddings, module.embedding_dim, std=1.0)
            module.dtype = torch.bfloat16
    num_experts, inter, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
            scales = torch.randint(118, 124, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=gen)
            experts.weight_loader(blocks, f"{name}_blocks")
            experts.weight_loader(scales, f"{name}_scales")
            experts.weight_loader(rand(num_experts, rows), f"{name}_bias")
        experts.finalize(torch.bfloat16)  # as the loader does: MXFP4 repacked for the C kernel when there is one
        layer.self_attn.sinks.data = rand(config.num_attention_heads, std=1.0)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model.eval()


def decode_context(batch: int, context: int, block_size: int, num_blocks_per_seq: int) -> Context:
    tables = torch.arange(batch * num_blocks_per_seq).view(batch, num_blocks_per_seq)
    pos = context - 1
    slots = tables[:, pos // block_size] * block_size + pos % block_size
    ctx = Context(q_starts=list(range(batch + 1)), context_lens=[context] * batch, block_size=block_size)
    ctx.slot_mapping, ctx.block_tables = slots, tables
    ctx.decode_seq_idx = list(range(batch))
    ctx.decode_rows = torch.arange(batch)
    ctx.decode_context_lens = torch.full((batch,), context, dtype=torch.long)
    ctx.decode_block_tables = tables
    k_pos = torch.arange(num_blocks_per_seq * block_size)
    ctx.decode_mask = (k_pos[None, :] < ctx.decode_context_lens[:, None])[:, None, None, :]
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = measure_bandwidth()
    model = build(args.layers)
    config = model.config
    block_size = 16
    blocks_per_seq = -(-args.context // block_size)
    batches = (1, 8)
    spec = kv_spec(config)
    layers_with_cache = [m for m in model.modules() if hasattr(m, "allocate_cache")]
    for layer, layer_spec in zip(layers_with_cache, spec.layers):
        layer.allocate_cache(max(batches) * blocks_per_seq, block_size, layer_spec, torch.bfloat16, "cpu")

    # distinct experts hit per step, from the router logits
    hits: list[int] = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(
            lambda mod, inp, out: hits.append(torch.topk(out, config.num_experts_per_tok).indices.unique().numel())
        )
    hidden, inter, heads, kv_heads, head_dim = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                                                config.num_key_value_heads, config.head_dim)  # fmt: skip
    attn_bytes = 2 * ((heads + 2 * kv_heads) * head_dim * (hidden + 1) + hidden * (heads * head_dim + 1))
    router_bytes = 2 * config.num_local_experts * (hidden + 1) + 2 * 2 * hidden  # + the two norms
    expert_bytes = (2 * inter * hidden + hidden * inter) * 17 // 32 + 2 * (2 * inter + hidden)  # MXFP4 + bf16 biases
    results = {}
    with torch.inference_mode():
        for batch in batches:
            ids = torch.randint(0, config.vocab_size, (batch,))
            positions = torch.full((batch,), args.context - 1, dtype=torch.long)
            times = []
            for step in range(args.steps + 1):  # one warm-up
                set_context(decode_context(batch, args.context, block_size, blocks_per_seq))
                hits.clear()
                start = time.perf_counter()
                model(ids, positions)
                elapsed = time.perf_counter() - start
                reset_context()
                if step:
                    times.append(elapsed)
            ms_per_layer_step = 1e3 * float(np.median(times)) / args.layers
            experts_hit = float(np.mean(hits))
            kv_read = 2 * batch * args.context * kv_heads * head_dim * 2  # K and V, bf16 (sliding layers read ≤ 128)
            step_bytes = attn_bytes + router_bytes + experts_hit * expert_bytes + kv_read
            roofline_ms = 1e3 * step_bytes / bandwidth
            results[f"batch_{batch}"] = {
                "ms_per_layer_step": round(ms_per_layer_step, 3),
                "ms_per_layer_per_token": round(ms_per_layer_step / batch, 3),
                "ms_per_token_24_layers": round(24 * ms_per_layer_step / batch, 1),
                "tok_s_24_layers": round(1e3 * batch / (24 * ms_per_layer_step), 2),
                "experts_hit_per_layer": experts_hit,
                "bytes_per_layer_step": int(step_bytes),
                "roofline_ms_per_layer_step": round(roofline_ms, 3),
                "fraction_of_roofline": round(roofline_ms / ms_per_layer_step, 3),
            }
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        git = ""
    record = {
        "bench": "gpt_oss_layer", "git": git, "device": "cpu", "threads": torch.get_num_threads(),
        "model": "gpt-oss-20b shapes, random", "dtype": "bfloat16", "quant": "mxfp4 experts", "layers": args.layers,
        "context": args.context, "bandwidth_gb_s": round(bandwidth / 1e9, 2), **results,
    }  # fmt: skip
    line = json.dumps(record)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
