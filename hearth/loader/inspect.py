"""Model metadata without tensor data: GGUF metadata or HF `config.json` → ModelConfig, and `hearth show` summaries."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any

from hearth.config import ModelConfig
from hearth.loader import ModelLoadError
from hearth.loader.gguf import GGUFFile, open_gguf

# GGUF general.architecture → HF model_type
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gpt-oss": "gpt_oss", "deepseek2": "deepseek_v3"}
# GGUF {arch}.expert_gating_func (llama.cpp's enum) → HF scoring_func
GGUF_GATING_FUNCS = {1: "softmax", 2: "sigmoid"}
# GGUF rope.scaling.* → HF rope_scaling keys
ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


def _first(value: Any) -> Any:
    """Per-layer arrays (e.g. head_count_kv in some files) → the first layer's value."""
    return value[0] if isinstance(value, list) and value else value


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    kind = meta.get(prefix + "type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    for key, hf_key in ROPE_SCALING_KEYS.items():
        if prefix + key in meta:
            scaling[hf_key] = meta[prefix + key]
    if prefix + "yarn_log_multiplier" in meta:  # llama.cpp writes 0.1 · mscale_all_dim (DeepSeek)
        scaling["mscale_all_dim"] = round(meta[prefix + "yarn_log_multiplier"] / 0.1, 6)
    return scaling


def read_gguf_config(gguf_file: GGUFFile | str) -> ModelConfig:
    """ModelConfig from GGUF metadata and tensor names (never tensor data)."""
    g = gguf_file if isinstance(gguf_file, GGUFFile) else open_gguf(gguf_file, check_types=False)
    meta, arch = g.metadata, g.architecture
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(g.path, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    model_type = GGUF_ARCHS[arch]
    names = {t.name for t in g.tensor_infos}

    def get(key: str, default: Any = None) -> Any:
        return _first(meta.get(f"{arch}.{key}", default))

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ModelLoadError(g.path, f"metadata has no {arch}.{key}")
        return get(key)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=get("vocab_size") or len(tokens),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length", 0),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or hidden // heads,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=model_type in ("qwen2", "gpt_oss") or "blk.0.attn_q.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        num_local_experts=get("expert_count", 0),
        num_experts_per_tok=get("expert_used_count", 0),
        extra={"gguf_architecture": arch, "has_rope_freqs": "rope_freqs.weight" in names},
    )
    if model_type == "gpt_oss":
        fields["intermediate_size"] = get("expert_feed_forward_length", 0)
        fields["sliding_window"] = get("attention.sliding_window")
        num_layers = fields["num_hidden_layers"]
        fields["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if model_type == "deepseek_v3":
        rope_dim = get("rope.dimension_count", 64)
        key_length = get("attention.key_length_mla") or get("attention.key_length", 0)
        fields.update(
            num_key_value_heads=heads,  # MLA: one latent per token; HF keeps kv heads = heads
            head_dim=rope_dim,
            moe_intermediate_size=get("expert_feed_forward_length", 0),
            kv_lora_rank=get("attention.kv_lora_rank", 0),
            q_lora_rank=get("attention.q_lora_rank") or None,
            qk_rope_head_dim=rope_dim,
            qk_nope_head_dim=key_length - rope_dim,
            v_head_dim=get("attention.value_length_mla") or get("attention.value_length", 0),
        )
        moe = {"first_k_dense_replace": "leading_dense_block_count", "n_shared_experts": "expert_shared_count",
               "routed_scaling_factor": "expert_weights_scale", "norm_topk_prob": "expert_weights_norm",
               "n_group": "expert_group_count", "topk_group": "expert_group_used_count"}  # fmt: skip
        fields["extra"].update({hf: get(key) for hf, key in moe.items() if get(key) is not None})
        # llama.cpp's expert gating enum; files without it (DeepSeek-V2/V2.5 conversions) gate with softmax
        gating = get("expert_gating_func", 1)
        if gating not in GGUF_GATING_FUNCS:
            raise ModelLoadError(g.path, f"unsupported {arch}.expert_gating_func {gating!r} (1 softmax, 2 sigmoid)")
        fields["extra"]["scoring_func"] = GGUF_GATING_FUNCS[gating]
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(g.path, f"invalid model metadata: {e}") from None


def read_hf_config(folder: str) -> ModelConfig:
    """ModelConfig from an HF folder's `config.json`."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(folder, "no config.json in folder") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(path, f"invalid config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(path, "invalid config.json: not a JSON object")
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise ModelLoadError(path, f"config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(path, str(e)) from None


def describe(path: str) -> dict[str, Any]:
    """Summary for `hearth show`: format, architecture, parameters, quantization, size, context, template."""
    if os.path.isdir(path):
        return _describe_hf(path)
    g = open_gguf(path, check_types=False)
    arch = g.architecture
    return {
        "format": "gguf",
        "architecture": arch,
        "num_parameters": sum(t.num_elements for t in g.tensor_infos),
        "quantization": dict(Counter(t.type_name for t in g.tensor_infos).most_common()),
        "file_size": g.file_size,
        "context_length": g.metadata.get(f"{arch}.context_length"),
        "has_chat_template": bool(g.metadata.get("tokenizer.chat_template")),
    }


def _describe_hf(folder: str) -> dict[str, Any]:
    from safetensors import safe_open

    from hearth.loader.safetensors import safetensors_files

    cfg = read_hf_config(folder)
    num_parameters, dtypes, size = 0, Counter(), 0
    for file in safetensors_files(folder):
        size += os.path.getsize(file)
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            for name in names:
                sl = f.get_slice(name)
                num_parameters += math.prod(sl.get_shape())
                dtypes[sl.get_dtype()] += 1
    template = os.path.join(folder, "tokenizer_config.json")
    has_template = os.path.isfile(os.path.join(folder, "chat_template.jinja"))
    if not has_template and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            has_template = "chat_template" in json.load(f)
    return {
        "format": "safetensors",
        "architecture": cfg.architecture,
        "num_parameters": num_parameters,
        "quantization": dict(dtypes.most_common()),
        "file_size": size,
        "context_length": cfg.max_position_embeddings,
        "has_chat_template": has_template,
    }
