"""Llama family: Llama 2/3.x, SmolLM2, Qwen2 (q/k/v biases) and the R1-Distill models, with HF module names.

Reference: transformers' modeling_llama.py / modeling_qwen2.py. q/k/v and gate/up are fused at load through
`packed_modules_mapping`. Tensor parallel as declared by the layers: q/k/v and gate/up split by output rows (heads),
o and down by input columns with one all-reduce each, embeddings and LM head by vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from hearth.config import ModelConfig
from hearth.layers.activation import SiluAndMul
from hearth.layers.attention import Attention
from hearth.layers.decoder import DecoderLayer, DecoderModel
from hearth.layers.linear import ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear
from hearth.layers.norm import RMSNorm
from hearth.layers.rotary import RotaryEmbedding, apply_rotary_emb_


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        # this rank's heads (all of them without tensor parallelism)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)  # fmt: skip
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        input_range=self.qkv_proj.q_range)  # fmt: skip
        window = None
        if config.layer_types is not None and config.layer_types[layer_idx] == "sliding_attention":
            window = config.sliding_window
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5, window)
        self.q_size, self.kv_size = q_size, kv_size

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # rotate q and k heads together, in place: [num_tokens, num_heads + num_kv_heads, head_dim]
        qk = apply_rotary_emb_(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden_states)))


class LlamaDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling)  # fmt: skip
        super().__init__(config, LlamaDecoderLayer, RMSNorm, rotary)


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    # HF checkpoint module name -> (fused module name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = None if config.tie_word_embeddings else ParallelLMHead(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        """After loading: a quantized tied table also gets its LM-head form now, not on the first request."""
        if self.lm_head is None:
            self.model.embed_tokens.tie_lm_head()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab]; under tensor parallelism rank 0 gets them whole, other ranks None."""
        if self.lm_head is None:
            return self.model.embed_tokens.as_lm_head(hidden_states)
        return self.lm_head(hidden_states)
