"""The decoder skeleton the families share (HF's Llama layout): embeddings, pre-norm residual layers, final norm.

A family builds its own attention, MLP and norms; the residual wiring and the once-per-forward rope tables live here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hearth.config import ModelConfig
from hearth.layers.linear import VocabParallelEmbedding
from hearth.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)). Subclasses set self_attn, mlp, input_layernorm and
    post_attention_layernorm (norms take an optional residual and return (normed, new residual))."""

    def forward(self, hidden_states, residual, cos, sin):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, cos, sin)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    """`model.*` of a causal LM: embed_tokens, layers, norm, rotary_emb."""

    def __init__(self, config: ModelConfig, layer_cls: Callable[[ModelConfig, int], nn.Module],
                 norm_cls: Callable[[int, float], nn.Module], rotary: RotaryEmbedding):  # fmt: skip
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden_states.dtype)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cos, sin)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states
