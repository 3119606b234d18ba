"""Exact parameter counts from each family's real tensor shapes, and weight bytes per storage format.

Shapes follow the HF checkpoints (docs/models.md §1.6, §2.4, §3, §4). Stdlib only: the planner runs without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hearth.config import ModelConfig

# kind of a tensor group, which decides how each format stores it:
#   embed  token embedding / lm_head        linear  attention, dense and shared-expert projections
#   expert routed MoE expert matrices       router  MoE gate matrix      vector  norms, biases, sinks (1-D)
KINDS = ("embed", "linear", "expert", "router", "vector")


@dataclass(slots=True, frozen=True)
class TensorGroup:
    """`count` tensors of one shape; `active` of them are read per token (decode, one sequence)."""

    name: str
    shape: tuple[int, ...]  # (out, in) for matrices
    count: int
    active: float
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def touched(self, batch: int = 1) -> float:
        """Tensors read per decode step of `batch` sequences. MoE experts: the expected union of `batch` independent
        top-k draws (uniform routing), count·(1 − (1 − k/E)^batch); dense tensors: all of them; embedding: none."""
        if self.count == 0:
            return 0.0
        return self.count * (1.0 - (1.0 - self.active / self.count) ** batch)


@dataclass(slots=True, frozen=True)
class Format:
    name: str
    description: str
    bits: float = 16.0  # GGUF block types: average bits per weight of matrices (vectors stay f32)


FORMATS = {
    "bf16": Format("bf16", "every tensor bf16 (safetensors)"),
    "fp8": Format("fp8", "DeepSeek FP8 e4m3 weights + fp32 128×128 block scales; embeddings, router, norms bf16"),
    "mxfp4": Format("mxfp4", "gpt-oss experts MXFP4 (32 × 4-bit + 1 e8m0 scale byte = 4.25 bits); the rest bf16"),
    "q8_0": Format("q8_0", "GGUF Q8_0 (34 bytes per 32 = 8.5 bpw), vectors f32", 8.5),
    "q6_k": Format("q6_k", "GGUF Q6_K (210 bytes per 256 = 6.5625 bpw), vectors f32", 6.5625),
    # NOTE: Q4_K_M mixes Q4_K (4.5 bpw) with Q6_K for attn_v / half of ffn_down / output; 4.85 is a typical
    # file-wide average (llama.cpp reports 4.8-4.9 bpw for 7-8B Llama files). Q5_K_M likewise at 5.69.
    "q5_k_m": Format("q5_k_m", "GGUF Q5_K_M mix, ~5.69 bpw average (stated estimate), vectors f32", 5.69),
    "q4_k_m": Format("q4_k_m", "GGUF Q4_K_M mix, ~4.85 bpw average (stated estimate), vectors f32", 4.85),
    "q4_1": Format("q4_1", "GGUF Q4_1 (20 bytes per 32 = 5.0 bpw), vectors f32", 5.0),
    "q4_0": Format("q4_0", "GGUF Q4_0 (18 bytes per 32 = 4.5 bpw), vectors f32", 4.5),
}
FAMILY_FORMATS = {
    "llama": ("bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0"),
    "qwen2": ("bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0"),
    "gpt_oss": ("bf16", "mxfp4"),
    "deepseek_v3": ("bf16", "fp8", "q8_0", "q4_k_m"),
}


@dataclass(slots=True)
class ParamCount:
    groups: list[TensorGroup]

    @property
    def total(self) -> int:
        return sum(g.count * g.numel for g in self.groups)

    @property
    def active(self) -> int:
        """Parameters read per token. The embedding is a one-row lookup, so it is not counted (as in the gpt-oss
        model card's 3.6B / 5.1B); a tied embedding counts once, as the lm_head."""
        return round(sum(g.active * g.numel for g in self.groups))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Tensor groups of the model that `cfg` describes (DeepSeek: without the MTP layer, as the 671B figure)."""
    builders = {"llama": _dense, "qwen2": _dense, "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek_v3}
    if cfg.model_type not in builders:
        raise ValueError(f"no parameter layout for model_type {cfg.model_type!r}")
    return ParamCount(builders[cfg.model_type](cfg))


def _embeddings(cfg: ModelConfig) -> list[TensorGroup]:
    V, H = cfg.vocab_size, cfg.hidden_size
    if cfg.tie_word_embeddings:
        return [TensorGroup("embed_tokens (tied lm_head)", (V, H), 1, 1, "embed")]
    return [TensorGroup("embed_tokens", (V, H), 1, 0, "embed"), TensorGroup("lm_head", (V, H), 1, 1, "embed")]


def _layer(name: str, shape: tuple[int, ...], layers: int, kind: str = "linear") -> TensorGroup:
    return TensorGroup(name, shape, layers, layers, kind)


def _dense(cfg: ModelConfig) -> list[TensorGroup]:
    H, L, I, d = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    groups = _embeddings(cfg) + [
        _layer("q_proj", (q, H), L), _layer("k_proj", (kv, H), L), _layer("v_proj", (kv, H), L),
        _layer("o_proj", (H, q), L), _layer("gate_proj", (I, H), L), _layer("up_proj", (I, H), L),
        _layer("down_proj", (H, I), L), _layer("layernorms", (H,), 2 * L, "vector"), _layer("norm", (H,), 1, "vector"),
    ]  # fmt: skip
    if cfg.attention_bias:  # Qwen2: q/k/v biases; Llama's attention_bias also puts one on o_proj
        groups += [_layer("q_proj.bias", (q,), L, "vector"), _layer("k_proj.bias", (kv,), L, "vector"),
                   _layer("v_proj.bias", (kv,), L, "vector")]  # fmt: skip
        if cfg.model_type == "llama":
            groups.append(_layer("o_proj.bias", (H,), L, "vector"))
    return groups


def _gpt_oss(cfg: ModelConfig) -> list[TensorGroup]:
    H, L, I, d = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.head_dim
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return _embeddings(cfg) + [
        _layer("q_proj", (q, H), L), _layer("k_proj", (kv, H), L), _layer("v_proj", (kv, H), L),
        _layer("o_proj", (H, q), L), _layer("qkv biases", (q + 2 * kv,), L, "vector"),
        _layer("o_proj.bias", (H,), L, "vector"), _layer("sinks", (cfg.num_attention_heads,), L, "vector"),
        _layer("router", (E, H), L, "router"), _layer("router.bias", (E,), L, "vector"),
        TensorGroup("experts.gate_up_proj", (2 * I, H), L * E, L * k, "expert"),  # gate/up interleaved rows
        TensorGroup("experts.gate_up_proj_bias", (2 * I,), L * E, L * k, "vector"),
        TensorGroup("experts.down_proj", (H, I), L * E, L * k, "expert"),
        TensorGroup("experts.down_proj_bias", (H,), L * E, L * k, "vector"),
        _layer("layernorms", (H,), 2 * L, "vector"), _layer("norm", (H,), 1, "vector"),
    ]  # fmt: skip


def _deepseek_v3(cfg: ModelConfig) -> list[TensorGroup]:
    H, L, nh = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    dn, dr, dv, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    E, k, mI = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    dense = min(int(cfg.extra.get("first_k_dense_replace", 0)), L)
    moe, shared = L - dense, int(cfg.extra.get("n_shared_experts") or 0) * mI
    groups = _embeddings(cfg)
    if cfg.q_lora_rank:
        qr = cfg.q_lora_rank
        groups += [_layer("q_a_proj", (qr, H), L), _layer("q_a_layernorm", (qr,), L, "vector"),
                   _layer("q_b_proj", (nh * (dn + dr), qr), L)]  # fmt: skip
    else:
        groups.append(_layer("q_proj", (nh * (dn + dr), H), L))
    groups += [
        _layer("kv_a_proj_with_mqa", (c + dr, H), L), _layer("kv_a_layernorm", (c,), L, "vector"),
        _layer("kv_b_proj", (nh * (dn + dv), c), L), _layer("o_proj", (H, nh * dv), L),
        _layer("layernorms", (H,), 2 * L, "vector"), _layer("norm", (H,), 1, "vector"),
    ]  # fmt: skip
    if dense:
        I = cfg.intermediate_size
        groups += [_layer("mlp.gate_proj", (I, H), dense), _layer("mlp.up_proj", (I, H), dense),
                   _layer("mlp.down_proj", (H, I), dense)]  # fmt: skip
    if moe:
        groups += [_layer("mlp.gate", (E, H), moe, "router"), _layer("e_score_correction_bias", (E,), moe, "vector"),
                   TensorGroup("experts.gate_proj", (mI, H), moe * E, moe * k, "expert"),
                   TensorGroup("experts.up_proj", (mI, H), moe * E, moe * k, "expert"),
                   TensorGroup("experts.down_proj", (H, mI), moe * E, moe * k, "expert")]  # fmt: skip
        if shared:
            groups += [_layer("shared_experts.gate_proj", (shared, H), moe),
                       _layer("shared_experts.up_proj", (shared, H), moe),
                       _layer("shared_experts.down_proj", (H, shared), moe)]  # fmt: skip
    return groups


def tensor_bytes(group: TensorGroup, fmt: str) -> float:
    """Bytes of ONE tensor of `group` stored in format `fmt`."""
    n, shape, kind = group.numel, group.shape, group.kind
    if fmt == "bf16":
        return 2.0 * n
    if fmt == "fp8":  # e4m3 + one fp32 scale per 128×128 block (weight_scale_inv), docs/models.md §2.4
        if kind in ("linear", "expert"):
            return n + 4.0 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
        return 2.0 * n
    if fmt == "mxfp4":  # per row: ceil(in/32) blocks of 16 bytes + 1 e8m0 scale byte, docs/models.md §1.6
        return shape[0] * math.ceil(shape[1] / 32) * 17.0 if kind == "expert" else 2.0 * n
    if fmt in FORMATS:  # GGUF: matrices at the type's bits per weight, 1-D tensors in f32
        return n * FORMATS[fmt].bits / 8 if len(shape) >= 2 else 4.0 * n
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def weight_bytes(params: ParamCount, fmt: str) -> int:
    """Bytes of all weights in `fmt`."""
    return round(sum(g.count * tensor_bytes(g, fmt) for g in params.groups))


def touched_bytes(params: ParamCount, fmt: str, batch: int = 1) -> int:
    """Weight bytes read by one decode step of `batch` sequences (active weights; MoE: the union of experts hit)."""
    return round(sum(g.touched(batch) * tensor_bytes(g, fmt) for g in params.groups))


def native_format(cfg: ModelConfig) -> str:
    """The format a family's official checkpoint ships in: mxfp4 (gpt-oss), fp8 (DeepSeek), else bf16."""
    method = (cfg.extra.get("quantization_config") or {}).get("quant_method")
    return method if method in ("mxfp4", "fp8") else "bf16"


def allowed_formats(cfg: ModelConfig) -> tuple[str, ...]:
    return FAMILY_FORMATS.get(cfg.model_type, ("bf16",))
