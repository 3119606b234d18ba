"""One DeepSeek-V3 MoE layer at its real shapes (hidden 7168, 256 routed experts of 2048, 8 active, 8 groups / top-4,
one shared expert) with random weights: ms per token at batch 1 and 8 in bf16 and in per-row int8 (the CPU formats;
FP8 checkpoints are dequantized on CPU), beside the memory-bandwidth roofline measured in the same run.

Only `--num-experts-held` distinct expert weights are allocated (the full 256 would need 22 GB in bf16): expert e
uses weights e mod held. The roofline counts the bytes of the distinct weights a step actually touches (shared
expert and router included) over the measured bandwidth, so model and roofline stay comparable; at batch 8 a full
256-expert layer would touch more distinct experts than a small pool does.

Prints one JSON object (and appends it to --out).
    python benchmarks/deepseek_layer.py --num-experts-held 16 --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

HIDDEN, MOE_INTER, NUM_EXPERTS, TOP_K, GROUPS, TOPK_GROUP = 7168, 2048, 256, 8, 8, 4


def measure_bandwidth(num_bytes: int = 1 << 29, repeat: int = 5) -> float:
    """Read bandwidth in GB/s: the best of `repeat` sums over a buffer far larger than the caches."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def build_layer(fmt: str, held: int):
    """A DeepseekV3MoE whose 256 experts share `held` distinct random weights, held as `fmt` (bf16 or int8)."""
    from hearth.config import ModelConfig
    from hearth.kernels.int8_mm import quantize_per_row
    from hearth.models.deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

    config = ModelConfig(model_type="deepseek_v3", vocab_size=129280, hidden_size=HIDDEN, intermediate_size=18432,
                         num_hidden_layers=1, num_attention_heads=128, num_key_value_heads=128, head_dim=64,
                         num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_INTER,
                         kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                         extra={"n_group": GROUPS, "topk_group": TOPK_GROUP, "n_shared_experts": 1,
                                "routed_scaling_factor": 2.5, "norm_topk_prob": True})  # fmt: skip
    layer = DeepseekV3MoE(config)
    gen = torch.Generator().manual_seed(0)
    layer.gate.weight = torch.randn(NUM_EXPERTS, HIDDEN, generator=gen) * 0.02
    layer.gate.e_score_correction_bias = torch.rand(NUM_EXPERTS, generator=gen) * 0.1

    def fill(linear, out_features: int, in_features: int) -> None:
        w = torch.randn(out_features, in_features, generator=gen, dtype=torch.bfloat16) * 0.02
        if fmt == "int8":
            linear.int8_weight, scales = quantize_per_row(w)
            linear.int8_scales = scales.to(torch.bfloat16)
        else:
            linear.weight = w

    pool = [DeepseekV3MLP(HIDDEN, MOE_INTER) for _ in range(held)]
    for mlp in pool + [layer.shared_experts]:
        fill(mlp.gate_up_proj, 2 * MOE_INTER, HIDDEN)
        fill(mlp.down_proj, HIDDEN, MOE_INTER)
    for e in range(NUM_EXPERTS):
        layer.experts[e] = pool[e % held]
    return layer


def expert_bytes(fmt: str) -> int:
    per_param = 1 if fmt == "int8" else 2
    scales = 2 * (3 * MOE_INTER + HIDDEN) if fmt == "int8" else 0  # bf16 row scales of gate_up and down
    return 3 * MOE_INTER * HIDDEN * per_param + scales


@torch.inference_mode()
def run_format(fmt: str, held: int, batch_sizes: list[int], repeat: int, bandwidth: float) -> dict:
    layer = build_layer(fmt, held)
    router_bytes = NUM_EXPERTS * HIDDEN * 4
    results = {}
    for batch in batch_sizes:
        hidden_states = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        layer(hidden_states)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            layer(hidden_states)
            times.append(time.perf_counter() - start)
        _, ids = layer.route(hidden_states)
        touched = len(set((ids % held).flatten().tolist()))
        step_bytes = (touched + 1) * expert_bytes(fmt) + router_bytes
        step_s = sorted(times)[len(times) // 2]
        roofline_s = step_bytes / (bandwidth * 1e9)
        results[f"batch_{batch}"] = {
            "ms_per_token": round(step_s * 1e3 / batch, 3),
            "roofline_ms_per_token": round(roofline_s * 1e3 / batch, 3),
            "fraction_of_roofline": round(roofline_s / step_s, 3),
            "distinct_experts_touched": touched,
            "bytes_per_step": step_bytes,
        }
    del layer
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-experts-held", type=int, default=16)
    parser.add_argument("--formats", default="bf16,int8")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bandwidth = measure_bandwidth()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    formats = {fmt: run_format(fmt, args.num_experts_held, batch_sizes, args.repeat, bandwidth)
               for fmt in args.formats.split(",")}  # fmt: skip
    best = min(formats, key=lambda f: formats[f][f"batch_{batch_sizes[0]}"]["ms_per_token"])
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        git = None
    record = {"bench": "deepseek_moe_layer", "git": git, "device": "cpu", "threads": torch.get_num_threads(),
              "shapes": {"hidden": HIDDEN, "moe_intermediate": MOE_INTER, "experts": NUM_EXPERTS, "top_k": TOP_K,
                         "shared_experts": 1, "experts_held": args.num_experts_held},
              "bandwidth_gb_s": round(bandwidth, 2), "formats": formats, "best_format": best,
              "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
