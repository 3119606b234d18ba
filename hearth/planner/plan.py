"""`plan()`: will a model fit on some hardware, at what context and concurrency, and how fast — pure arithmetic on the
config (params.py for weights, hearth.config.kv_spec / kv_bytes for the KV cache, the same numbers the engine uses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hearth.config import ModelConfig, kv_bytes, kv_bytes_per_token, kv_spec, tensor_parallel_config
from hearth.planner.hardware import Hardware
from hearth.planner.params import (
    ParamCount,
    allowed_formats,
    count_params,
    native_format,
    tensor_bytes,
    touched_bytes,
    weight_bytes,
)

# Headroom rule: plan against 90% of memory, less 1 GiB per device for the runtime (CUDA context / allocator slack,
# activations, sampler buffers). Weights + KV cache must fit in what is left.
HEADROOM_FRACTION = 0.10
RUNTIME_OVERHEAD_BYTES = 1 << 30
APPLE_GPU_FRACTION = 0.75  # Apple silicon: macOS lets the GPU wire ~75% of unified memory by default
# Decode roofline: a step reads the touched weights once plus every sequence's KV cache; achieved bandwidth is taken as
# 70% of the catalogue figure. On CPU the bandwidth is this machine's own read probe (hardware.measure_read_bandwidth),
# what decode does, and Hearth's decode reaches 74-89% of it (gpt-oss-20b, SmolLM2; docs/performance.md): 80%. Plus a
# per-layer cost beyond the bandwidth share, per step: on CPU 20 µs (the fused decode's barriers), calibrated against
# SmolLM2's (30 layers) measured decode; on accelerators a few kernel launches per layer.
DECODE_EFFICIENCY = 0.70
CPU_DECODE_EFFICIENCY = 0.80
LAYER_OVERHEAD_S = {"cpu": 2e-5, "gpu": 2e-5, "apple": 5e-5, "npu": 5e-5}
# Prefill: 2 FLOPs per active parameter per token (attention's context-dependent FLOPs left out, so long prompts
# come out optimistic) at 50% of the device's dense throughput for the format's compute type.
PREFILL_EFFICIENCY = 0.50
COMPUTE_TYPE = {"fp8": "fp8", "mxfp4": "fp4"}  # others compute in bf16 (GGUF blocks are dequantized into bf16)

KV_DTYPE = "bfloat16"
DEFAULT_CONTEXT = 8192  # as the engine: the model's context length capped at 8192


def compute_type(fmt: str, hw: Hardware) -> str:
    """The tensor-core type a format runs its matmuls in on `hw`: fp8 / fp4 where the device has them, else bf16."""
    kind = COMPUTE_TYPE.get(fmt, "bf16")
    return kind if kind in hw.flops else "bf16"


@dataclass(slots=True)
class Plan:
    model: str
    architecture: str
    params_total: int
    params_active: int
    format: str
    weights_bytes: int
    kv_bytes_per_token: int  # every layer in full; sliding-window layers cap what a sequence holds (kv_bytes_per_seq)
    kv_bytes_per_seq: int  # one sequence at `context`
    context: int
    concurrency: int
    memory_bytes: int  # weights + concurrency × kv_bytes_per_seq
    usable_bytes: int  # hardware memory after headroom
    hardware: str
    hardware_memory_bytes: int
    devices: int
    fits: bool
    max_context: int  # longest context (≤ the model's) that fits at this concurrency; 0 if the weights alone do not
    max_concurrency: int  # sequences of `context` tokens that fit
    decode_tok_s: float  # per sequence, at `context` tokens and `concurrency` sequences
    decode_tok_s_total: float
    prefill_tok_s: float | None  # None when the device's FLOP/s are unknown
    advice: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    # per device under `hearth serve -tp devices` (the rank holding the most heads), as the engine sizes each rank
    weights_bytes_per_device: int = 0
    kv_bytes_per_token_per_device: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def usable_bytes(hw: Hardware) -> int:
    fraction = APPLE_GPU_FRACTION if hw.kind == "apple" else 1 - HEADROOM_FRACTION
    return max(0, int(hw.memory_bytes * fraction) - hw.devices * RUNTIME_OVERHEAD_BYTES)


def _max_context(cfg: ModelConfig, budget: int, concurrency: int) -> int:
    """Largest n ≤ the model's context with concurrency × kv_bytes(n) ≤ budget (kv_bytes grows with n)."""
    spec, lo, hi = kv_spec(cfg), 0, cfg.max_position_embeddings
    if budget < 0:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if concurrency * kv_bytes(spec, mid, KV_DTYPE) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# tensors every rank holds whole under tensor parallelism: MLA's latent projections and their norms (and MoE routers)
REPLICATED_GROUPS = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")


def per_device_weight_bytes(params: ParamCount, fmt: str, devices: int, weights: int) -> int:
    """Weight bytes on each of `devices` ranks: an even share of what splits plus the replicated groups whole.
    `weights`: the model's real total (a file's size), the groups' estimate rescaled to it."""
    estimate = weight_bytes(params, fmt)
    whole = sum(g.count * tensor_bytes(g, fmt) for g in params.groups if g.name in REPLICATED_GROUPS or g.kind == "router")
    scale = weights / estimate if estimate else 1.0
    return round(((estimate - whole) / devices + whole) * scale)


def kv_copies(config: ModelConfig, devices: int) -> int:
    """How many devices hold each cached token under tensor parallelism: MLA's latent cache (one vector per token per
    layer, read by every query head) is whole on every device, other caches split by KV heads."""
    return devices if config.kv_lora_rank else 1


@dataclass(slots=True, frozen=True)
class FileBytes:
    """A local file's weight bytes as a decode step reads them (from its tensor table): `dense` read every step,
    `experts` the routed experts' tensors, of which each token reads `expert_fraction` (top-k / experts)."""

    dense: int
    experts: int = 0
    expert_fraction: float = 0.0

    def touched(self, batch: int = 1) -> float:
        """Bytes one step of `batch` sequences reads: the expected union of their experts, as TensorGroup.touched."""
        return self.dense + self.experts * (1.0 - (1.0 - self.expert_fraction) ** batch)


def gguf_decode_bytes(tensor_infos, cfg):
    """What one decode step reads of a GGUF file, from its tensor table: every tensor but the token embedding (a row
    per token; read in full only when it doubles as the LM head, i.e. the file has no `output.weight`), except the
    routed experts (`*_exps.*`), of which a token reads top-k of E."""
    names = {t.name for t in tensor_infos}
    dense = experts = 0
    for t in tensor_infos:
        if "_exps." in t.name:
            experts += t.nbytes
        elif t.name != "token_embd.weight" or "output.weight" not in names:
            dense += t.nbytes
    fraction = cfg.num_experts_per_tok / cfg.num_local_experts if experts and cfg.num_local_experts else 0.0
    return FileBytes(dense, experts, fraction) if fraction else FileBytes(dense + experts)


def decode_efficiency(hw: Hardware) -> float:
    return CPU_DECODE_EFFICIENCY if hw.kind == "cpu" else DECODE_EFFICIENCY


def decode_tok_s(cfg: ModelConfig, params: ParamCount, fmt: str, hw: Hardware, context: int, concurrency: int,
                 scale: float = 1.0, file_bytes: FileBytes | None = None) -> float:  # fmt: skip
    """Per-sequence decode tokens/s: one step reads the weights touched by `concurrency` tokens (a local file's own
    byte counts when given, else the format's estimate × `scale`) plus each sequence's KV cache at `context` (on every
    device that holds a copy), at `decode_efficiency` × bandwidth, capped by compute."""
    weights = file_bytes.touched(concurrency) if file_bytes else touched_bytes(params, fmt, concurrency) * scale
    step_bytes = weights + concurrency * kv_bytes(kv_spec(cfg), context) * kv_copies(cfg, hw.devices)
    step_s = step_bytes / (hw.bandwidth * decode_efficiency(hw))
    step_s += cfg.num_hidden_layers * LAYER_OVERHEAD_S.get(hw.kind, 2e-5)
    flops = hw.flops.get(compute_type(fmt, hw))
    if flops:
        step_s = max(step_s, 2 * params.active * concurrency / (flops * PREFILL_EFFICIENCY))
    return 1.0 / step_s


def per_device_kv_bytes_per_token(config: ModelConfig, devices: int) -> int:
    """KV bytes per token on the rank that holds the most KV heads under tensor parallelism over `devices` ranks (the
    engine's split); an even share when the heads do not split over that many. MLA: the whole latent cache."""
    try:
        return max(kv_bytes_per_token(kv_spec(tensor_parallel_config(config, r, devices)), KV_DTYPE)
                   for r in range(devices))  # fmt: skip
    except ValueError:
        return -(-kv_bytes_per_token(kv_spec(config), KV_DTYPE) // devices)


def plan(config: ModelConfig, hardware: Hardware, context: int | None = None, concurrency: int = 1,
         format: str | None = None, model: str = "", weights_bytes_override: int | None = None,
         file_bytes: FileBytes | None = None) -> Plan:  # fmt: skip
    """Memory, fit and speed of `config` in `format` on `hardware`. `weights_bytes_override`: the real size of a
    local file (GGUF), used instead of the format's estimate; `file_bytes`: what of it a decode step reads."""
    params = count_params(config)
    fmt = format or native_format(config)
    if fmt not in allowed_formats(config) and weights_bytes_override is None:
        raise ValueError(f"format {fmt!r} not available for {config.model_type} "
                         f"(choose from: {', '.join(allowed_formats(config))})")  # fmt: skip
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    context = min(config.max_position_embeddings, DEFAULT_CONTEXT) if context is None else context
    if context < 1:
        raise ValueError(f"--context must be at least 1, got {context}")
    estimate = weight_bytes(params, fmt if fmt in allowed_formats(config) else "bf16")
    weights = weights_bytes_override or estimate
    scale = weights / estimate  # a real file: touched bytes scale with its size
    spec = kv_spec(config)
    per_seq = kv_bytes(spec, context, KV_DTYPE)
    copies = kv_copies(config, hardware.devices)  # MLA: each device holds the whole latent cache
    memory = weights + concurrency * per_seq * copies
    usable = usable_bytes(hardware)
    fits = memory <= usable and context <= config.max_position_embeddings
    decode = decode_tok_s(config, params, fmt, hardware, context, concurrency, scale, file_bytes)
    compute = compute_type(fmt, hardware)
    flops = hardware.flops.get(compute)
    result = Plan(
        model=model or config.architecture, architecture=config.architecture, params_total=params.total,
        params_active=params.active, format=fmt, weights_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(spec, KV_DTYPE), kv_bytes_per_seq=per_seq, context=context,
        concurrency=concurrency, memory_bytes=memory, usable_bytes=usable, hardware=hardware.label,
        hardware_memory_bytes=hardware.memory_bytes, devices=hardware.devices, fits=fits,
        max_context=_max_context(config, (usable - weights) // copies, concurrency),
        max_concurrency=max(0, (usable - weights) // (per_seq * copies)) if per_seq else 0,
        decode_tok_s=decode, decode_tok_s_total=decode * concurrency,
        weights_bytes_per_device=per_device_weight_bytes(params, fmt if fmt in allowed_formats(config) else "bf16",
                                                         hardware.devices, weights),  # fmt: skip
        kv_bytes_per_token_per_device=per_device_kv_bytes_per_token(config, hardware.devices),
        prefill_tok_s=flops * PREFILL_EFFICIENCY / (2 * params.active) if flops else None,
        assumptions=[
            f"usable memory = {usable_bytes(hardware) / hardware.memory_bytes:.0%} of memory "
            f"({APPLE_GPU_FRACTION if hardware.kind == 'apple' else 1 - HEADROOM_FRACTION:.0%} − "
            f"{RUNTIME_OVERHEAD_BYTES >> 30} GiB per device)",
            f"KV cache {KV_DTYPE}; memory = weights + concurrency × KV at the full context"
            + (f" × {copies} devices (MLA's latent cache is replicated on each, not divided)" if copies > 1 else ""),
            f"decode = {decode_efficiency(hardware):.0%} of {hardware.bandwidth / 1e9:.1f} GB/s / (weights touched"
            f"{' (this file: ' + _gb(file_bytes.touched(concurrency)) + ')' if file_bytes else ''} + KV read per step) "
            f"+ {LAYER_OVERHEAD_S.get(hardware.kind, 2e-5) * 1e6:.0f} µs per layer dispatch",
            f"prefill = {PREFILL_EFFICIENCY:.0%} of dense {compute} FLOP/s / (2 × active params)",
        ],
    )  # fmt: skip
    result.advice = _advice(config, params, hardware, result)
    return result


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _advice(cfg: ModelConfig, params: ParamCount, hw: Hardware, p: Plan) -> list[str]:
    gb = 1e9
    advice: list[str] = []
    if hw.note:
        advice.append(hw.note)
    if p.fits:
        if p.max_context < cfg.max_position_embeddings:
            advice.append(f"fits up to {p.max_context} tokens of context at concurrency {p.concurrency} "
                          f"(the model allows {cfg.max_position_embeddings})")  # fmt: skip
        return advice
    if p.context > cfg.max_position_embeddings:
        advice.append(f"the model's context is at most {cfg.max_position_embeddings} tokens")
    over = p.memory_bytes - p.usable_bytes
    for fmt in allowed_formats(cfg):
        size = weight_bytes(params, fmt)
        if size < p.weights_bytes and size + p.memory_bytes - p.weights_bytes <= p.usable_bytes:
            speed = decode_tok_s(cfg, params, fmt, hw, p.context, p.concurrency)
            advice.append(f"use --format {fmt}: weights {size / gb:.1f} GB, fits, ~{speed:.0f} tok/s decode")
    if p.max_context > 0:
        advice.append(f"shorten the context to {p.max_context} tokens (--context {p.max_context})")
    if p.concurrency > 1 and p.max_concurrency >= 1:
        advice.append(f"lower --concurrency to {p.max_concurrency}")
    for n in (2, 4, 8, 16, 32, 64):
        if n > hw.devices and p.memory_bytes <= usable_bytes(hw.scaled(n)):
            advice.append(f"use {n}× {hw.name} (--devices {n})")
            break
    if over > 0:
        host = f" (this machine has {hw.host_memory_bytes / gb:.0f} GB RAM)" if hw.host_memory_bytes else ""
        advice.append(f"offload {over / gb:.1f} GB of weights to CPU RAM{host}; decode is then bound by the host's "
                      "memory bandwidth for that share")  # fmt: skip
    return advice
