"""GGUF tensor names → HF names per architecture, and llama.cpp's Q/K row permutation (docs/models.md §4.2)."""

from __future__ import annotations

import re

import torch

from hearth.quant.gguf_types import QuantizedTensor

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output": "lm_head",
    "output_norm": "model.norm",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# gpt-oss (docs/models.md §4.1): llama.cpp splits the interleaved gate/up experts into ffn_gate_exps / ffn_up_exps and stores
# experts as (out, in), unlike HF's (in, out) `down_proj`; they map to their own kinds (`gate_proj_weight`, ...) that the
# gpt-oss experts module re-interleaves. NOTE: GGUF MXFP4 nibble order differs from HF's (quant/mxfp4.py converts).
GPT_OSS_BLOCK_NAMES = {
    **{k: v for k, v in BLOCK_NAMES.items() if k.startswith("attn_") or k == "attn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.router",
}
GPT_OSS_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# DeepSeek-V2/V3 (`deepseek2`, docs/models.md §2): MLA projections, shared experts and the router's correction bias. Newer
# converters store kv_b split as attn_k_b [H, c, nope] (transposed) and attn_v_b [H, v, c]; they map to kinds `k_b` /
# `v_b` of kv_b_proj, which joins them. Stacked experts map to kinds of `mlp.experts`, which splits them per expert.
# The MTP layer's own tensors (`blk.N.nextn.*`, N = block_count - 1) map to the HF names of layer N (DEEPSEEK2_NEXTN_NAMES);
# the loader skips layer N unless the MTP layer is built (speculative decoding with it).
DEEPSEEK2_BLOCK_NAMES = {
    **{k: v for k, v in BLOCK_NAMES.items() if k not in ("attn_k", "attn_v")},
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
DEEPSEEK2_SPECIAL_NAMES = {
    "attn_k_b.weight": "self_attn.kv_b_proj.k_b",
    "attn_v_b.weight": "self_attn.kv_b_proj.v_b",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj_weight",
    "ffn_up_exps.weight": "mlp.experts.up_proj_weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj_weight",
}
DEEPSEEK2_NEXTN_NAMES = {
    "eh_proj": "eh_proj",
    "enorm": "enorm",
    "hnorm": "hnorm",
    "shared_head_norm": "shared_head.norm",
    "shared_head_head": "shared_head.head",
    "embed_tokens": "embed_tokens",
}
NAMED_ARCHS = ("llama", "qwen2", "gpt-oss", "deepseek2")
PERMUTED_ARCHS = ("llama",)  # NOTE: llama.cpp permutes q/k rows only for arch llama; qwen2 stays in HF layout
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def gguf_to_hf_name(arch: str, name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for names to skip or not known."""
    if arch not in NAMED_ARCHS:
        return None
    if arch == "gpt-oss":
        return _gpt_oss_name(name)
    if arch == "deepseek2":
        return _deepseek2_name(name)
    if m := _BLOCK_RE.fullmatch(name):
        layer, part, suffix = m.groups()
        hf = BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    if m := _GLOBAL_RE.fullmatch(name):
        hf = GLOBAL_NAMES.get(m.group(1))  # rope_freqs and anything unknown → None
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def _gpt_oss_name(name: str) -> str | None:
    if m := re.fullmatch(r"blk\.(\d+)\.attn_sinks(\.weight)?", name):
        return f"model.layers.{m.group(1)}.self_attn.sinks"
    if m := _BLOCK_RE.fullmatch(name):
        layer, part, suffix = m.groups()
        if part in GPT_OSS_EXPERT_NAMES:
            return f"model.layers.{layer}.mlp.experts.{GPT_OSS_EXPERT_NAMES[part]}_{suffix}"
        hf = GPT_OSS_BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    if m := _GLOBAL_RE.fullmatch(name):
        hf = GLOBAL_NAMES.get(m.group(1))
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def _deepseek2_name(name: str) -> str | None:
    if m := re.fullmatch(r"blk\.(\d+)\.nextn\.(\w+)\.weight", name):
        hf = DEEPSEEK2_NEXTN_NAMES.get(m.group(2))
        return None if hf is None else f"model.layers.{m.group(1)}.{hf}.weight"
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+\.(?:weight|bias))", name):
        layer, rest = m.groups()
        if rest in DEEPSEEK2_SPECIAL_NAMES:
            return f"model.layers.{layer}.{DEEPSEEK2_SPECIAL_NAMES[rest]}"
    if m := _BLOCK_RE.fullmatch(name):
        layer, part, suffix = m.groups()
        hf = DEEPSEEK2_BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    if m := _GLOBAL_RE.fullmatch(name):
        hf = GLOBAL_NAMES.get(m.group(1))
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def is_permuted(arch: str, name: str) -> bool:
    """Whether this GGUF tensor carries llama.cpp's Q/K row permutation (undo with `unpermute_qk`)."""
    return arch in PERMUTED_ARCHS and bool(re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", name))


def _permute_rows(t: torch.Tensor, n_head: int, inverse: bool) -> torch.Tensor:
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot split {rows} rows into {n_head} heads of pairs")
    half = rows // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return t.reshape(*split, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def _apply(t: torch.Tensor | QuantizedTensor, n_head: int, inverse: bool) -> torch.Tensor | QuantizedTensor:
    if isinstance(t, QuantizedTensor):
        # blocks run along each row, so moving whole rows of raw bytes needs no dequantization
        return QuantizedTensor(_permute_rows(t.data, n_head, inverse), t.qtype, t.shape)
    return _permute_rows(t, n_head, inverse)


def unpermute_qk(t: torch.Tensor | QuantizedTensor, n_head: int) -> torch.Tensor | QuantizedTensor:
    """Undo llama.cpp's q/k row permutation: interleaved rope pairs (2i, 2i+1) → HF rotate_half (i, i + hd/2).

    Works on a weight, a 1-D bias or a QuantizedTensor. Pass `num_attention_heads` for q, `num_key_value_heads` for k.
    """
    return _apply(t, n_head, inverse=True)


def permute_qk(t: torch.Tensor | QuantizedTensor, n_head: int) -> torch.Tensor | QuantizedTensor:
    """What llama.cpp's converter does to HF q/k rows (`LlamaModel.permute`); used to build test fixtures."""
    return _apply(t, n_head, inverse=False)
