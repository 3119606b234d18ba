"""The fused decode transform: a loaded Llama-family model -> one C call per decode step (hearth/kernels/llama_decode).

A transform over the model, applied by the model runner after the KV cache is allocated, so that the model stays a
plain torch module: it reads the model's weights and caches and hands them to the kernel; the model never knows.
Under tensor parallelism it reads this rank's shard (its heads, its part of the MLP, its vocabulary rows) and the
step sums the o and down partial outputs over the ranks between blocks (LlamaDecoder's `reduce`), so a rank decodes
with the arithmetic of tp=1's default decode step: float32 hidden states, int8 activations.
"""

from __future__ import annotations

import torch
from torch import nn

from hearth.kernels import llama_decode
from hearth.layers.distributed import all_reduce, gather_last_dim
from hearth.models.llama import LlamaForCausalLM


def build_fused_decode(model: nn.Module) -> llama_decode.LlamaDecoder | None:
    """The whole decode step of `model` in one C call, or None where it does not apply: it needs a Llama-family model,
    the C kernels, every projection and the LM head held as GGUF blocks, and a bf16 KV cache (allocated first)."""
    if not isinstance(model, LlamaForCausalLM):
        return None
    cfg, m = model.config, model.model
    attn0, mlp0 = m.layers[0].self_attn, m.layers[0].mlp
    # this rank's sizes (the whole model's without tensor parallelism)
    num_heads, num_kv_heads = attn0.num_heads, attn0.num_kv_heads
    intermediate = mlp0.down_proj.in_features
    if not llama_decode.available() or not llama_decode.decoder_supports(
        cfg.hidden_size, num_heads, num_kv_heads, cfg.head_dim, intermediate
    ):
        return None
    head = m.embed_tokens if model.lm_head is None else model.lm_head
    lm_head = head.lm_blocks if model.lm_head is None else head.blocks
    if lm_head is None:
        return None
    layers = []
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
        if any(lin.blocks is None for lin in linears.values()) or attn.attn.k_cache is None:
            return None
        if attn.attn.k_cache.dtype != torch.bfloat16 or mlp.down_proj.bias is not None or attn.o_proj.bias is not None:
            return None
        entry = {name: lin.blocks for name, lin in linears.items()}
        entry.update(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                     qkv_bias=attn.qkv_proj.bias, k_cache=attn.attn.k_cache, v_cache=attn.attn.v_cache,
                     window=attn.attn.sliding_window)  # fmt: skip
        layers.append(entry)
    split = getattr(head, "tp_size", 1) > 1
    return llama_decode.LlamaDecoder(
        layers=layers, final_norm=m.norm.weight, cos=m.rotary_emb.cos, sin=m.rotary_emb.sin, lm_head=lm_head,
        hidden=cfg.hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=cfg.head_dim,
        intermediate=intermediate, eps=cfg.rms_norm_eps, scale=m.layers[0].self_attn.attn.scale,
        vocab=lm_head.n if split else cfg.vocab_size,
        embed=m.embed_tokens, reduce=all_reduce if split else None,
        gather=(lambda logits: gather_last_dim(logits, head.part_sizes)) if split else None,
    )  # fmt: skip
