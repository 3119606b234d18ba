"""load_model(model, ref): stream a checkpoint's tensors into a model through each module's weight_loader.

The model never learns the file format: GGUF names are mapped to HF names and llama.cpp's Q/K row permutation is
undone here; fused projections are resolved through the model's `packed_modules_mapping`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from hearth.loader import ModelLoadError
from hearth.loader.resolve import ModelRef

logger = logging.getLogger(__name__)

SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_checkpoint(ref: ModelRef, config, skip=None):
    """(HF name, tensor or QuantizedTensor) pairs of a checkpoint, in file order. `skip(name)`: safetensors tensors
    it is true for are passed over unread (GGUF tensors are views of the file's map: read only where used)."""
    if ref.format == "gguf":
        from hearth.loader.gguf import open_gguf
        from hearth.loader.names import gguf_to_hf_name, unpermute_qk

        gguf_file = open_gguf(ref.path)
        arch = gguf_file.architecture
        for name, tensor in gguf_file.iter_tensors():
            if name == "rope_freqs.weight":  # Llama 3.x rope scaling, stored as frequency divisors
                yield "model.rotary_emb.freq_factors", tensor
                continue
            hf_name = gguf_to_hf_name(arch, name)
            if hf_name is None:
                continue
            if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
                heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
                tensor = unpermute_qk(tensor, heads)
            yield hf_name, tensor
    else:
        from hearth.loader.safetensors import iter_safetensors

        yield from iter_safetensors(ref.path, skip)


def _target(model: nn.Module, name: str) -> tuple[nn.Module, str, int] | None:
    """The module owning an HF parameter name, the parameter kind ("weight"/"bias") and the fused shard id."""
    module_path, _, kind = name.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    shard_id = 0
    packed = getattr(model, "packed_modules_mapping", {})
    if leaf in packed:
        leaf, shard_id = packed[leaf]
    path = f"{parent}.{leaf}" if parent else leaf
    try:
        return model.get_submodule(path), kind, shard_id
    except AttributeError:
        return None


def load_model(model: nn.Module, ref: ModelRef, dtype: torch.dtype, keep_quantized: bool = True) -> None:
    """Fill `model` from the checkpoint at `ref`; raise ModelLoadError for anything missing or unexpected."""
    start = time.perf_counter()
    loaded: set[tuple[str, str]] = set()
    rename = getattr(model, "checkpoint_name", None)  # a model's own modules for names outside its layers (DeepSeek's MTP)

    def dropped(name: str) -> bool:  # a module that keeps nothing (expert parallel: another rank's expert)
        target = _target(model, rename(name) if rename is not None else name)
        return target is not None and getattr(target[0], "drops_weights", False)

    tensors = iter_checkpoint(ref, model.config, dropped)
    for name, tensor in tqdm(tensors, desc="loading", unit=" tensors", leave=False, mininterval=0.5):
        if name.endswith(SKIPPED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        if rename is not None:
            name = rename(name)
        target = _target(model, name)
        if target is None:
            if name.startswith(f"model.layers.{model.config.num_hidden_layers}."):
                continue  # e.g. DeepSeek's MTP layer, when it is not built
            raise ModelLoadError(ref.path, f"unexpected tensor {name!r} for {model.config.architecture}")
        module, kind, shard_id = target
        try:
            if hasattr(module, "weight_loader"):
                module.weight_loader(tensor, kind, shard_id)
            else:
                param = getattr(module, kind)
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
                param.data = (tensor.dequantize() if hasattr(tensor, "dequantize") else tensor).to(dtype).clone()
        except ValueError as e:
            raise ModelLoadError(ref.path, f"tensor {name!r}: {e}") from None
        loaded.add((name.rpartition(".")[0], kind))
    gguf_file = None
    if ref.format == "gguf":
        from hearth.loader.gguf import open_gguf

        gguf_file = open_gguf(ref.path)
    for mod_name, module in reversed(list(model.named_modules())):  # children before parents
        if hasattr(module, "finalize"):
            try:
                module.finalize(dtype, keep_quantized)
            except ValueError as e:
                raise ModelLoadError(ref.path, f"module {mod_name!r}: {e}") from None
            if gguf_file is not None:  # what it repacked is no longer read from the map: keep the peak low
                gguf_file.release_pages()
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and (mod_name, "weight") not in loaded:
            raise ModelLoadError(ref.path, f"missing tensor {mod_name}.weight")
    if gguf_file is not None:  # repacked and copied weights no longer read the file's map: let its pages go
        gguf_file.release_pages()
    logger.info("loaded %s in %.1fs", ref.path, time.perf_counter() - start)


def checkpoint_weight_bytes(ref: ModelRef, keep_quantized: bool, element_bytes: int) -> int:
    """About how many bytes the loaded weights will hold, from the tensor table or file sizes alone (read before any
    weight, so that memory checks fail fast). GGUF weights stay in their blocks (`keep_quantized`) or become floats
    of `element_bytes` each (MXFP4 experts always stay packed); safetensors weights take `element_bytes` each."""
    if ref.format == "gguf":
        from hearth.loader.gguf import open_gguf

        total = 0
        for info in open_gguf(ref.path).tensor_infos:
            packed = keep_quantized or info.type_name == "MXFP4"
            total += info.nbytes if packed else info.num_elements * element_bytes
        return total
    from safetensors import SafetensorError, safe_open

    from hearth.loader.safetensors import safetensors_files

    total = 0
    for file in safetensors_files(ref.path):
        try:
            with safe_open(file, framework="pt") as f:
                names = f.keys()
                total += sum(math.prod(f.get_slice(name).get_shape()) for name in names) * element_bytes
        except (SafetensorError, OSError):  # loading it will say what is wrong
            total += os.path.getsize(file)
    return total


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # QuantizedTensor, Mxfp4Weight, ...
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def model_nbytes(model: nn.Module) -> int:
    """Bytes the loaded weights hold in memory, in whatever form they are kept (packed int4, int8, MXFP4, FP8, dense),
    counting shared storage once; KV caches are not weights and are left out."""
    seen, total = set(), 0
    for module in model.modules():
        for name, value in vars(module).items():
            if name == "_modules" or "cache" in name:
                continue
            for t in _tensors(value):
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if t.device.type != "meta" and key not in seen:
                    seen.add(key)
                    total += key[1]
    return total
