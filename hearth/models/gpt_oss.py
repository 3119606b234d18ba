"""gpt-oss (20b, 120b): alternating sliding-window / full attention with learned sinks, top-k-then-softmax MoE with a
clamped, interleaved SwiGLU, YaRN rope with concentration, MXFP4 experts kept packed. HF module names.

Reference: transformers' modeling_gpt_oss.py and docs/models.md §1. Experts load from HF bf16 (`gate_up_proj` [E, H, 2I]),
HF MXFP4 (`*_blocks` / `*_scales`) or GGUF (split gate/up, GGUF nibble order; loader/names.py maps the names).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from hearth.config import ModelConfig
from hearth.layers.attention import Attention
from hearth.layers.decoder import DecoderLayer, DecoderModel
from hearth.layers.linear import Linear, ParallelLMHead, QKVParallelLinear, RowParallelLinear
from hearth.layers.moe import topk_softmax
from hearth.layers.mxfp4_experts import Mxfp4Experts
from hearth.layers.norm import RMSNorm
from hearth.layers.rotary import RotaryEmbedding, apply_rotary_emb_
from hearth.layers.weights import dense


def GptOssRMSNorm(hidden_size: int, eps: float = 1e-5) -> RMSNorm:
    """gpt-oss order: normalise and multiply by the gain in float32, then cast (Llama casts before the gain)."""
    return RMSNorm(hidden_size, eps, scale_in_float32=True)


def swiglu_oss(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[.., 2I] with gate at even and linear at odd indices → [.., I]: clamped gate·σ(α·gate) times (up + 1)."""
    gate = h[..., ::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        # this rank's heads (all of them without tensor parallelism), with their sinks
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)  # fmt: skip
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=config.attention_bias, input_range=self.qkv_proj.q_range)  # fmt: skip
        self.total_heads = config.num_attention_heads
        self.sinks = nn.Parameter(torch.zeros(self.num_heads), requires_grad=False)
        self._sinks = None
        window = config.sliding_window if layer_types(config)[layer_idx] == "sliding_attention" else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, window)

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        """The checkpoint's `sinks` [num_attention_heads]; this rank keeps its heads' (placed in finalize)."""
        if kind != "sinks":
            raise ValueError(f"unexpected tensor kind {kind!r}")
        if tuple(tensor.shape) != (self.total_heads,):
            raise ValueError(f"sinks: expected shape {(self.total_heads,)}, got {tuple(tensor.shape)}")
        first = self.qkv_proj.q_range[0] // self.head_dim
        self._sinks = dense(tensor)[first : first + self.num_heads]

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        if self._sinks is None:
            raise ValueError("missing sinks")
        self.sinks.data = self._sinks.to(dtype).clone()
        self._sinks = None

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # rope on q and k in place, in one pass (a C kernel in bf16: the torch ops' values)
        qk = apply_rotary_emb_(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [num_tokens, heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, sinks=self.sinks))


class GptOssExperts(Mxfp4Experts):
    """gpt-oss's experts: MXFP4-capable experts with the clamped, interleaved SwiGLU (alpha, limit from the config)."""

    def __init__(self, config: ModelConfig):
        alpha = float(config.extra.get("swiglu_alpha", 1.702))
        limit = float(config.extra.get("swiglu_limit", 7.0))
        super().__init__(config.num_local_experts, config.hidden_size, config.intermediate_size,
                         partial(swiglu_oss, alpha=alpha, limit=limit), swiglu_oss=(alpha, limit))  # fmt: skip


class GptOssMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.router.keep_dense = True  # routing in the checkpoint's precision, also under --int8-weights
        self.experts = GptOssExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights, ids = topk_softmax(self.router(hidden_states), self.top_k)
        return self.experts(hidden_states, weights, ids)


class GptOssDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GptOssAttention(config, layer_idx)
        self.mlp = GptOssMLP(config)
        self.input_layernorm = GptOssRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GptOssRMSNorm(config.hidden_size, config.rms_norm_eps)


def layer_types(config: ModelConfig) -> list[str]:
    """HF layer_types, or gpt-oss's rule (even layers slide) when the config has none."""
    if config.layer_types is not None:
        return config.layer_types
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]


def rope_scaling(config: ModelConfig) -> dict | None:
    """gpt-oss YaRN does not round the correction range (HF `truncate: False`); GGUF metadata does not say so."""
    scaling = config.rope_scaling
    if scaling is None or scaling.get("rope_type") != "yarn":
        return scaling
    return {**scaling, "truncate": scaling.get("truncate", False)}


class GptOssModel(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                 rope_scaling(config))  # fmt: skip
        super().__init__(config, GptOssDecoderLayer, GptOssRMSNorm, rotary)


class GptOssForCausalLM(nn.Module):
    supports_tensor_parallel = True  # experts: with expert parallel (layers/mxfp4_experts.py)
    packed_modules_mapping = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.layer_types is None:
            config.layer_types = layer_types(config)  # so kv_spec() marks the sliding layers
        self.config = config
        self.model = GptOssModel(config)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden_states)

    def set_moe_reference(self, enabled: bool = True) -> None:
        """Run every MoE layer through the reference loop with dequantize-then-matmul experts."""
        for layer in self.model.layers:
            layer.mlp.experts.use_reference = enabled
