"""Model metadata without tensor data: GGUF metadata or HF `config.json` → ModelConfig, and `hearth show` summaries."""

from __future__ import annotations

import json
import math
import os
import re
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


COUNT_LIMIT = 1 << 24  # any width, count or length in a real model is far below this
CONTEXT_LIMIT = (1 << 32) - 1  # llama.cpp reads context_length as a uint32
_MISSING = object()


class _Metadata:
    """Typed, range-checked reads of `{arch}.*` keys: a corrupt value is a one-line ModelLoadError, never a
    ZeroDivisionError, a NaN that surfaces at generation, or a count that makes the model builder run for hours."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.meta, self.arch = g, g.metadata, arch

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(self.g.path, reason)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.meta:
            if default is _MISSING:
                raise self.fail(f"metadata has no {full}")
            return default
        value = self.meta[full]
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv in some files): Hearth's layers are uniform
            if not value or any(v != value[0] for v in value):
                raise self.fail(f"{full} varies per layer ({value[:8]}{'...' if len(value) > 8 else ''}): not supported")
            value = value[0]
        return value

    def int(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = COUNT_LIMIT) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{self.arch}.{key} is {value!r}, not an integer")
        if not lo <= value <= hi:
            raise self.fail(f"{self.arch}.{key} is {value}, outside {lo} to {hi}")
        return value

    def float(self, key: str, default: Any = _MISSING, above: float = 0.0, hi: float = math.inf) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{self.arch}.{key} is {value!r}, not a number")
        if not (math.isfinite(value) and above < value <= hi):
            raise self.fail(f"{self.arch}.{key} is {value}: must be finite, greater than {above}"
                            + (f" and at most {hi}" if hi < math.inf else ""))  # fmt: skip
        return float(value)

    def token_id(self, key: str, vocab: int) -> int | None:
        value = self.meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise self.fail(f"tokenizer.ggml.{key} is {value!r}, not a token id below the vocabulary size {vocab}")
        return value


def _rope_scaling(m: _Metadata) -> dict[str, Any] | None:
    kind = m.meta.get(f"{m.arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn", "llama3"):
        raise m.fail(f"{m.arch}.rope.scaling.type {kind!r} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": m.float("rope.scaling.factor", hi=1e6)}
    if f"{m.arch}.rope.scaling.original_context_length" in m.meta:
        scaling["original_max_position_embeddings"] = m.int("rope.scaling.original_context_length", hi=CONTEXT_LIMIT)
    if f"{m.arch}.rope.scaling.attn_factor" in m.meta:
        scaling["attention_factor"] = m.float("rope.scaling.attn_factor", hi=1e3)
    for key in ("yarn_beta_fast", "yarn_beta_slow"):
        if f"{m.arch}.rope.scaling.{key}" in m.meta:
            scaling[ROPE_SCALING_KEYS[key]] = m.float(f"rope.scaling.{key}", hi=1e6)
    if f"{m.arch}.rope.scaling.yarn_log_multiplier" in m.meta:  # llama.cpp writes 0.1 · mscale_all_dim (DeepSeek)
        multiplier = m.float("rope.scaling.yarn_log_multiplier", above=-math.inf, hi=1e3)
        scaling["mscale_all_dim"] = round(multiplier / 0.1, 6)
    return scaling


def read_gguf_config(gguf_file: GGUFFile | str, check_tensors: bool = True) -> ModelConfig:
    """ModelConfig from GGUF metadata and tensor names (never tensor data).

    Every hyper-parameter is type- and range-checked, and (with `check_tensors`) the whole config is checked against
    the tensor table before anything is built from it: layer, head and expert counts and every expected tensor's
    shape. `check_tensors=False` reads a partial file (tests of the metadata alone)."""
    g = gguf_file if isinstance(gguf_file, GGUFFile) else open_gguf(gguf_file, check_types=False)
    meta, arch = g.metadata, g.architecture
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(g.path, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    model_type = GGUF_ARCHS[arch]
    names = {t.name for t in g.tensor_infos}
    m = _Metadata(g, arch)
    block_count = m.int("block_count")
    if block_count > len(g.tensor_infos):  # before anything loops over the layers
        raise m.fail(f"{arch}.block_count is {block_count}, but the file has only {len(g.tensor_infos)} tensors")
    hidden, heads = m.int("embedding_length"), m.int("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise m.fail("tokenizer.ggml.tokens is not an array of strings")
    vocab = m.int("vocab_size", None) or len(tokens)
    if not 1 <= vocab <= COUNT_LIMIT:
        raise m.fail(f"the vocabulary size is {vocab} (from {arch}.vocab_size or tokenizer.ggml.tokens)")
    _check_tokenizer_metadata(m, len(tokens))
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = m.token_id(key, vocab)
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    head_dim = m.int("attention.key_length", None)
    if head_dim is None:
        if hidden % heads:
            raise m.fail(f"{arch}.embedding_length {hidden} does not split into {heads} heads (no key_length given)")
        head_dim = hidden // heads
    if model_type != "deepseek_v3" and m.int("attention.value_length", head_dim) != head_dim:
        raise m.fail(f"{arch}.attention.value_length differs from the key length {head_dim} (not supported)")
    kv_heads = m.int("attention.head_count_kv", heads)
    nextn = m.int("nextn_predict_layers", 0, lo=0, hi=block_count - 1)  # DeepSeek-V3's MTP layers are not decoder layers
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=m.int("feed_forward_length", 0, lo=0),
        num_hidden_layers=block_count - nextn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5, hi=1.0),
        rope_theta=m.float("rope.freq_base", 10000.0, above=1.0),
        rope_scaling=_rope_scaling(m),
        max_position_embeddings=m.int("context_length", 2048, hi=CONTEXT_LIMIT),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=model_type in ("qwen2", "gpt_oss") or "blk.0.attn_q.bias" in names,
        bos_token_id=m.token_id("bos_token_id", vocab),
        eos_token_ids=eos_ids,
        num_local_experts=m.int("expert_count", 0, lo=0),
        num_experts_per_tok=m.int("expert_used_count", 0, lo=0),
        extra={"gguf_architecture": arch, "has_rope_freqs": "rope_freqs.weight" in names},
    )
    if model_type == "gpt_oss":
        fields["intermediate_size"] = m.int("expert_feed_forward_length")
        fields["sliding_window"] = m.int("attention.sliding_window", hi=CONTEXT_LIMIT)
        num_layers = fields["num_hidden_layers"]
        fields["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if model_type == "deepseek_v3":
        fields["extra"]["num_nextn_predict_layers"] = nextn
        rope_dim = m.int("rope.dimension_count", 64)
        key_length = m.int("attention.key_length_mla", None) or m.int("attention.key_length")
        if key_length <= rope_dim:
            raise m.fail(f"{arch} key length {key_length} leaves no room beside {rope_dim} rope dimensions")
        fields.update(
            num_key_value_heads=heads,  # MLA: one latent per token; HF keeps kv heads = heads
            head_dim=rope_dim,
            moe_intermediate_size=m.int("expert_feed_forward_length", 0, lo=0),
            kv_lora_rank=m.int("attention.kv_lora_rank"),
            q_lora_rank=m.int("attention.q_lora_rank", None, lo=0) or None,
            qk_rope_head_dim=rope_dim,
            qk_nope_head_dim=key_length - rope_dim,
            v_head_dim=m.int("attention.value_length_mla", None) or m.int("attention.value_length"),
        )
        extra = fields["extra"]
        extra["first_k_dense_replace"] = m.int("leading_dense_block_count", 0, lo=0, hi=block_count)
        extra["n_shared_experts"] = m.int("expert_shared_count", 0, lo=0)
        extra["n_group"] = m.int("expert_group_count", 1)
        extra["topk_group"] = m.int("expert_group_used_count", 1)
        if f"{arch}.expert_weights_scale" in meta:
            extra["routed_scaling_factor"] = m.float("expert_weights_scale", hi=1e6)
        if f"{arch}.expert_weights_norm" in meta:
            extra["norm_topk_prob"] = bool(m.raw("expert_weights_norm"))
        # llama.cpp's expert gating enum; files without it (DeepSeek-V2/V2.5 conversions) gate with softmax
        gating = m.raw("expert_gating_func", 1)
        if gating not in GGUF_GATING_FUNCS:
            raise ModelLoadError(g.path, f"unsupported {arch}.expert_gating_func {gating!r} (1 softmax, 2 sigmoid)")
        extra["scoring_func"] = GGUF_GATING_FUNCS[gating]
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(g.path, f"invalid model metadata: {e}") from None
    _check_moe(m, cfg)
    if check_tensors:
        check_gguf_tensors(g, cfg)
    return cfg


TOKENIZER_TYPES = {"model": str, "pre": str, "chat_template": str, "token_type": list, "scores": list, "merges": list}


def _check_tokenizer_metadata(m: _Metadata, num_tokens: int) -> None:
    """The `tokenizer.*` values the tokenizer reads have the types it expects (a corrupt type is a clear error here,
    not an AttributeError inside it); per-token arrays match the vocabulary."""
    for key, kind in TOKENIZER_TYPES.items():
        value = m.meta.get(f"tokenizer.ggml.{key}" if key != "chat_template" else "tokenizer.chat_template")
        if value is not None and not isinstance(value, kind):
            raise m.fail(f"tokenizer.ggml.{key} is a {type(value).__name__}, not a {kind.__name__}")
    for key, kinds in (("token_type", (int,)), ("scores", (int, float)), ("merges", (str,))):
        values = m.meta.get(f"tokenizer.ggml.{key}") or []
        if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
            raise m.fail(f"tokenizer.ggml.{key} holds values of the wrong type")
        if key != "merges" and values and len(values) != num_tokens:
            raise m.fail(f"tokenizer.ggml.{key} has {len(values)} entries for {num_tokens} tokens")
        if key == "scores" and not all(math.isfinite(v) for v in values):
            raise m.fail("tokenizer.ggml.scores holds a NaN or infinite score")
    if num_tokens:
        m.token_id("unknown_token_id", num_tokens)
        m.token_id("padding_token_id", num_tokens)


def _check_moe(m: _Metadata, cfg: ModelConfig) -> None:
    experts, used = cfg.num_local_experts, cfg.num_experts_per_tok
    if cfg.model_type == "gpt_oss" and not experts:
        raise m.fail(f"{m.arch}.expert_count is missing or 0: gpt-oss layers are all mixture-of-experts")
    if cfg.model_type in ("llama", "qwen2") and experts:
        raise m.fail(f"{m.arch} with {experts} experts (mixture of experts) is not supported")
    if experts and not 1 <= used <= experts:
        raise m.fail(f"{m.arch}.expert_used_count is {used}: must be between 1 and expert_count ({experts})")
    if cfg.model_type == "deepseek_v3" and experts:
        groups, used_groups = cfg.extra["n_group"], cfg.extra["topk_group"]
        if experts % groups or experts // groups < 2 or used_groups > groups:
            raise m.fail(f"{experts} experts do not split into {groups} groups of at least 2 with {used_groups} used")
        if used > used_groups * (experts // groups):
            raise m.fail(f"{m.arch}.expert_used_count {used} is more than the {used_groups} used groups hold")
        if cfg.moe_intermediate_size < 1:
            raise m.fail(f"{m.arch}.expert_feed_forward_length is missing or 0")


_LAYER_RE = re.compile(r"blk\.(\d+)\.")


def expected_gguf_tensors(cfg: ModelConfig, arch: str, names: set[str]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """GGUF name → (torch-order shape, required) of every tensor a model of this config loads. Alternatives the file
    may choose between (a tied or separate output, DeepSeek's q_a/q_b or q, kv_b whole or split) are decided by
    which names are present."""
    hidden, vocab, heads = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((vocab, hidden), True),
        "output_norm.weight": ((hidden,), True),
        "output.weight": ((vocab, hidden), cfg.model_type == "gpt_oss"),
    }
    hd, kv = cfg.head_dim, cfg.num_key_value_heads
    # DeepSeek's MTP layer (block num_hidden_layers): an ordinary MoE block plus its nextn tensors, checked where present
    mtp_layers = min(1, cfg.extra.get("num_nextn_predict_layers") or 0) if cfg.model_type == "deepseek_v3" else 0
    for i in range(cfg.num_hidden_layers + mtp_layers):
        b = f"blk.{i}."
        required = i < cfg.num_hidden_layers
        layer = {"attn_norm.weight": (hidden,)}
        if cfg.model_type in ("llama", "qwen2", "gpt_oss"):
            layer |= {"attn_q.weight": (heads * hd, hidden), "attn_k.weight": (kv * hd, hidden),
                      "attn_v.weight": (kv * hd, hidden), "attn_output.weight": (hidden, heads * hd)}  # fmt: skip
            if cfg.attention_bias:
                layer |= {"attn_q.bias": (heads * hd,), "attn_k.bias": (kv * hd,), "attn_v.bias": (kv * hd,)}
        if cfg.model_type in ("llama", "qwen2"):
            ff = cfg.intermediate_size
            layer |= {"ffn_norm.weight": (hidden,), "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden),
                      "ffn_down.weight": (hidden, ff)}  # fmt: skip
        elif cfg.model_type == "gpt_oss":
            e, ff = cfg.num_local_experts, cfg.intermediate_size
            layer |= {"attn_output.bias": (hidden,), "attn_sinks.weight": (heads,), "post_attention_norm.weight": (hidden,),
                      "ffn_gate_inp.weight": (e, hidden), "ffn_gate_inp.bias": (e,),
                      "ffn_gate_exps.weight": (e, ff, hidden), "ffn_gate_exps.bias": (e, ff),
                      "ffn_up_exps.weight": (e, ff, hidden), "ffn_up_exps.bias": (e, ff),
                      "ffn_down_exps.weight": (e, hidden, ff), "ffn_down_exps.bias": (e, hidden)}  # fmt: skip
            if b + "attn_sinks" in names:  # some converters leave the suffix off
                del layer["attn_sinks.weight"]
                out[b + "attn_sinks"] = ((heads,), True)
        else:  # deepseek_v3
            c, rope, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
            layer |= {"ffn_norm.weight": (hidden,), "attn_kv_a_mqa.weight": (c + rope, hidden),
                      "attn_kv_a_norm.weight": (c,), "attn_output.weight": (hidden, heads * v)}  # fmt: skip
            if cfg.q_lora_rank:
                q = cfg.q_lora_rank
                layer |= {"attn_q_a.weight": (q, hidden), "attn_q_a_norm.weight": (q,),
                          "attn_q_b.weight": (heads * (nope + rope), q)}  # fmt: skip
            else:
                layer["attn_q.weight"] = (heads * (nope + rope), hidden)
            if b + "attn_kv_b.weight" in names:
                layer["attn_kv_b.weight"] = (heads * (nope + v), c)
            else:
                layer |= {"attn_k_b.weight": (heads, c, nope), "attn_v_b.weight": (heads, v, c)}
            if i < cfg.extra.get("first_k_dense_replace", 0) or not cfg.num_local_experts:
                ff = cfg.intermediate_size
                layer |= {"ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff)}
            else:
                e, ff = cfg.num_local_experts, cfg.moe_intermediate_size
                layer |= {"ffn_gate_inp.weight": (e, hidden), "ffn_gate_exps.weight": (e, ff, hidden),
                          "ffn_up_exps.weight": (e, ff, hidden), "ffn_down_exps.weight": (e, hidden, ff)}  # fmt: skip
                out[b + "exp_probs_b.bias"] = ((e,), False)
                shared = cfg.extra.get("n_shared_experts", 0) * ff
                if shared:
                    layer |= {"ffn_gate_shexp.weight": (shared, hidden), "ffn_up_shexp.weight": (shared, hidden),
                              "ffn_down_shexp.weight": (hidden, shared)}  # fmt: skip
        if not required:
            layer |= {"nextn.eh_proj.weight": (hidden, 2 * hidden), "nextn.enorm.weight": (hidden,),
                      "nextn.hnorm.weight": (hidden,), "nextn.shared_head_norm.weight": (hidden,),
                      "nextn.shared_head_head.weight": (vocab, hidden),
                      "nextn.embed_tokens.weight": (vocab, hidden)}  # fmt: skip
        out.update({b + k: (shape, required) for k, shape in layer.items()})
    if cfg.model_type == "llama":
        out["rope_freqs.weight"] = ((hd // 2,), False)
    return out


def check_gguf_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    """The config against the tensor table: every layer's tensors present with the shapes the config implies, no
    tensor past the last layer, nothing the model would not load. Reads names and shapes only."""
    from hearth.loader.names import gguf_to_hf_name

    arch = g.architecture
    names = {t.name for t in g.tensor_infos}
    num_layers = cfg.num_hidden_layers
    mtp = num_layers if cfg.model_type == "deepseek_v3" else None  # the loader skips DeepSeek's MTP layer
    for name in names:
        if (match := _LAYER_RE.match(name)) and int(match.group(1)) >= num_layers and int(match.group(1)) != mtp:
            raise ModelLoadError(g.path, f"tensor {name!r} is past the model's {num_layers} layers "
                                         f"({arch}.block_count): corrupt or mismatched metadata")  # fmt: skip
    if cfg.model_type in ("llama", "qwen2", "gpt_oss"):
        rope_dim = g.metadata.get(f"{arch}.rope.dimension_count")
        if rope_dim is not None and rope_dim != cfg.head_dim:
            raise ModelLoadError(g.path, f"{arch}.rope.dimension_count {rope_dim} differs from the head size "
                                         f"{cfg.head_dim} (partial rotary embeddings are not supported)")  # fmt: skip
    if cfg.head_dim % 2:
        raise ModelLoadError(g.path, f"the rotary head size {cfg.head_dim} is odd")
    expected = expected_gguf_tensors(cfg, arch, names)
    shapes = {t.name: t.shape for t in g.tensor_infos}
    for name, (shape, required) in expected.items():
        if name not in shapes:
            if required:
                raise ModelLoadError(g.path, f"missing tensor {name!r} (the metadata describes {num_layers} layers)")
            continue
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(g.path, f"tensor {name!r} has shape {tuple(shapes[name])}, but the metadata implies "
                                         f"{shape}: corrupt or mismatched metadata")  # fmt: skip
    for name in shapes:
        match = _LAYER_RE.match(name)
        if name in expected or (match and int(match.group(1)) == mtp):
            continue
        if gguf_to_hf_name(arch, name) is not None:
            raise ModelLoadError(g.path, f"unexpected tensor {name!r} for {cfg.architecture} with this metadata")


def mtp_parts(path: str, fmt: str, cfg: ModelConfig) -> dict[str, bool] | None:
    """Which tensors of DeepSeek's MTP layer (layer `num_hidden_layers`) a checkpoint holds, from its tensor names
    alone: None when it has none (no `eh_proj`), else whether it has its own embedding and LM head (`embed_tokens`,
    `head`; where absent, the model's own are shared)."""
    layer = cfg.num_hidden_layers
    if fmt == "gguf":
        names = {t.name for t in open_gguf(path, check_types=False).tensor_infos}
        prefix, own = f"blk.{layer}.nextn.", {"eh_proj": "eh_proj", "embed_tokens": "embed_tokens",
                                              "head": "shared_head_head"}  # fmt: skip
    else:
        from safetensors import safe_open

        from hearth.loader.safetensors import safetensors_files

        names = set()
        for file in safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        prefix, own = f"model.layers.{layer}.", {"eh_proj": "eh_proj", "embed_tokens": "embed_tokens",
                                                 "head": "shared_head.head"}  # fmt: skip
    if f"{prefix}{own['eh_proj']}.weight" not in names:
        return None
    return {part: f"{prefix}{own[part]}.weight" in names for part in ("embed_tokens", "head")}


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
