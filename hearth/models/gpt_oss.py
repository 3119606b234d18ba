"""gpt-oss (20b, 120b): alternating sliding-window / full attention with learned sinks, top-k-then-softmax MoE with a
clamped, interleaved SwiGLU, YaRN rope with concentration, MXFP4 experts kept packed. HF module names.

Reference: transformers' modeling_gpt_oss.py and docs/models.md §1. Experts load from HF bf16 (`gate_up_proj` [E, H, 2I]),
HF MXFP4 (`*_blocks` / `*_scales`) or GGUF (split gate/up, GGUF nibble order; loader/names.py maps the names).

NOTE: sliding layers attend only to their window but the paged cache still holds every token for them: the block
tables are shared by all layers, so dropping old blocks per layer needs per-layer tables in the block manager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hearth.config import ModelConfig
from hearth.kernels import mxfp4_cpu
from hearth.kernels.mxfp4_cpu import R16Mxfp4
from hearth.layers.attention import Attention
from hearth.layers.decoder import DecoderLayer, DecoderModel
from hearth.layers.linear import Linear
from hearth.layers.moe import fused_moe, grouped_moe, moe_ref, topk_softmax
from hearth.layers.norm import RMSNorm
from hearth.layers.rotary import RotaryEmbedding, apply_rotary_emb
from hearth.quant import mxfp4
from hearth.quant.gguf_types import QuantizedTensor
from hearth.quant.mxfp4 import Mxfp4Weight


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
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias,
                               output_sizes=[self.q_size, self.kv_size, self.kv_size])  # fmt: skip
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads), requires_grad=False)
        window = config.sliding_window if layer_types(config)[layer_idx] == "sliding_attention" else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, window)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, sinks=self.sinks))


class GptOssExperts(nn.Module):
    """All experts of one layer: gate_up [E, 2I, H] (interleaved gate/up rows) and down [E, H, I], as `(out, in)`,
    each either dense in the compute dtype or packed MXFP4, plus float biases. MXFP4 is held as `Mxfp4Weight` (HF
    layout; float32 runs, or no C compiler) or, for bf16 runs with the C kernels, repacked at load as `R16Mxfp4` (the
    same bits), which runs every expert hit in one int8-activation kernel call per projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.alpha = float(config.extra.get("swiglu_alpha", 1.702))
        self.limit = float(config.extra.get("swiglu_limit", 7.0))
        self._parts: dict[str, torch.Tensor | QuantizedTensor] = {}
        self.gate_up: torch.Tensor | Mxfp4Weight | R16Mxfp4 | None = None
        self.down: torch.Tensor | Mxfp4Weight | R16Mxfp4 | None = None
        self.gate_up_bias: torch.Tensor | None = None
        self.down_bias: torch.Tensor | None = None
        self.use_reference = False  # route through moe_ref (tests)

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        self._parts[kind] = tensor

    @property
    def nbytes(self) -> int:
        total = 0
        for w in (self.gate_up, self.down, self.gate_up_bias, self.down_bias):
            total += w.nbytes if isinstance(w, (Mxfp4Weight, R16Mxfp4)) else w.numel() * w.element_size()
        return total

    def _weight(self, name: str, out_features: int, in_features: int) -> torch.Tensor | Mxfp4Weight:
        """One projection as (E, out, in) from whichever layout the checkpoint has."""
        parts, shape = self._parts, (self.num_experts, out_features, in_features)
        if f"{name}_blocks" in parts:  # HF / original MXFP4
            w = Mxfp4Weight(parts.pop(f"{name}_blocks").contiguous(), parts.pop(f"{name}_scales").contiguous())
        elif name in parts:  # HF dense: (E, in, out)
            w = parts.pop(name).transpose(1, 2)
        elif name == "gate_up_proj" and "gate_proj_weight" in parts:  # GGUF: split gate / up, (E, out, in)
            gate, up = self._gguf(parts.pop("gate_proj_weight")), self._gguf(parts.pop("up_proj_weight"))
            if isinstance(gate, Mxfp4Weight) and isinstance(up, Mxfp4Weight):
                blocks = torch.stack([gate.blocks, up.blocks], dim=2).flatten(1, 2)
                w = Mxfp4Weight(blocks.contiguous(), torch.stack([gate.scales, up.scales], dim=2).flatten(1, 2))
            else:
                w = torch.stack([_dense(gate), _dense(up)], dim=2).flatten(1, 2)
        elif name == "down_proj" and "down_proj_weight" in parts:
            w = self._gguf(parts.pop("down_proj_weight"))
        else:
            raise ValueError(f"missing {name}")
        if tuple(w.shape) != shape:
            raise ValueError(f"{name}: expected (experts, out, in) = {shape}, got {tuple(w.shape)}")
        return w

    @staticmethod
    def _gguf(t):
        if isinstance(t, QuantizedTensor) and t.type_name == "MXFP4":
            return mxfp4.from_gguf(t.data, tuple(t.shape))
        return t

    def _bias(self, name: str) -> torch.Tensor:
        parts = self._parts
        if f"{name}_bias" in parts:
            return _dense(parts.pop(f"{name}_bias"))
        if name == "gate_up_proj" and "gate_proj_bias" in parts:
            gate, up = _dense(parts.pop("gate_proj_bias")), _dense(parts.pop("up_proj_bias"))
            return torch.stack([gate, up], dim=-1).flatten(-2)
        raise ValueError(f"missing {name}_bias")

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        """MXFP4 stays packed whatever `keep_quantized` says: its dequantization is exact, so float32 runs lose nothing.
        With bf16 and the C kernels it is repacked for the int8-activation kernel (`R16Mxfp4`)."""
        inter, hidden = self.intermediate_size, self.hidden_size
        gate_up = self._weight("gate_up_proj", 2 * inter, hidden)
        down = self._weight("down_proj", hidden, inter)
        self.gate_up_bias = self._bias("gate_up_proj").to(dtype).contiguous()
        self.down_bias = self._bias("down_proj").to(dtype).contiguous()
        if self._parts:
            raise ValueError(f"unexpected expert tensors {sorted(self._parts)}")
        self.gate_up = gate_up if isinstance(gate_up, Mxfp4Weight) else _dense(gate_up).to(dtype).contiguous()
        self.down = down if isinstance(down, Mxfp4Weight) else _dense(down).to(dtype).contiguous()
        packed = isinstance(gate_up, Mxfp4Weight) and isinstance(down, Mxfp4Weight)
        if packed and dtype == torch.bfloat16 and mxfp4_cpu.available():  # the int8-activation kernel's form
            self.gate_up = mxfp4_cpu.repack(gate_up.blocks, gate_up.scales)
            self.down = mxfp4_cpu.repack(down.blocks, down.scales)

    def _linear(self, w, bias: torch.Tensor, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        w = _unpack(w[expert_id]) if isinstance(w, R16Mxfp4) else w[expert_id]
        if isinstance(w, Mxfp4Weight):
            return mxfp4.mxfp4_matmul(x, w.blocks, w.scales, bias[expert_id])
        return F.linear(x, w, bias[expert_id])

    def expert(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        h = self._linear(self.gate_up, self.gate_up_bias, expert_id, x)
        return self._linear(self.down, self.down_bias, expert_id, swiglu_oss(h, self.alpha, self.limit))

    def expert_ref(self, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        """Same expert through dequantize-then-matmul (mxfp4_matmul_ref)."""

        def linear(w, bias, x):
            w = _unpack(w[expert_id]) if isinstance(w, R16Mxfp4) else w[expert_id]
            if isinstance(w, Mxfp4Weight):
                return mxfp4.mxfp4_matmul_ref(x, w.blocks, w.scales, bias[expert_id])
            return F.linear(x, w, bias[expert_id])

        h = linear(self.gate_up, self.gate_up_bias, x)
        return linear(self.down, self.down_bias, swiglu_oss(h, self.alpha, self.limit))

    def experts_q8(self, x: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Rows grouped by expert through both repacked projections (int8 activations, float32 in between)."""
        rows = torch.repeat_interleave(torch.tensor(expert_ids), torch.tensor(counts))  # each row's expert
        h = mxfp4_cpu.moe_q8(x, self.gate_up, expert_ids, counts) + self.gate_up_bias[rows].float()
        h = swiglu_oss(h, self.alpha, self.limit)
        return mxfp4_cpu.moe_q8(h, self.down, expert_ids, counts) + self.down_bias[rows].float()

    def forward(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return moe_ref(hidden_states, weights, ids, self.expert_ref)
        if isinstance(self.gate_up, R16Mxfp4) and isinstance(self.down, R16Mxfp4):
            return grouped_moe(hidden_states, weights, ids, self.experts_q8)
        return fused_moe(hidden_states, weights, ids, self.expert)


def _unpack(w: R16Mxfp4) -> Mxfp4Weight:
    return Mxfp4Weight(*mxfp4_cpu.unpack(w))


def _dense(t) -> torch.Tensor:
    if isinstance(t, R16Mxfp4):
        t = _unpack(t)
    return t.dequantize() if isinstance(t, (QuantizedTensor, Mxfp4Weight)) else t


class GptOssMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True)
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
    packed_modules_mapping = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.layer_types is None:
            config.layer_types = layer_types(config)  # so kv_spec() marks the sliding layers
        self.config = config
        self.model = GptOssModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def set_moe_reference(self, enabled: bool = True) -> None:
        """Run every MoE layer through the reference loop with dequantize-then-matmul experts."""
        for layer in self.model.layers:
            layer.mlp.experts.use_reference = enabled
