"""model_type (from config.json or GGUF `general.architecture`) -> model class, imported on first use."""

from __future__ import annotations

import importlib

from torch import nn

from hearth.config import ModelConfig

# model_type -> "module:class"; one line per family
MODELS = {
    "llama": "hearth.models.llama:LlamaForCausalLM",
    "qwen2": "hearth.models.llama:LlamaForCausalLM",
    "gpt_oss": "hearth.models.gpt_oss:GptOssForCausalLM",
    "deepseek_v3": "hearth.models.deepseek_v3:DeepseekV3ForCausalLM",
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    target = MODELS.get(config.model_type)
    if target is None:
        raise ValueError(f"model type {config.model_type!r} is not supported yet")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
