"""model_type (from config.json or GGUF `general.architecture`) -> model class."""

from __future__ import annotations

from torch import nn

from hearth.config import ModelConfig


def model_class(config: ModelConfig) -> type[nn.Module]:
    from hearth.models.llama import LlamaForCausalLM

    registry: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}
    try:
        return registry[config.model_type]
    except KeyError:
        raise ValueError(f"model type {config.model_type!r} is not supported yet") from None
