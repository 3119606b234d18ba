"""load_model(model, ref): stream a checkpoint's tensors into a model through each module's weight_loader.

The model never learns the file format: GGUF names are mapped to HF names and llama.cpp's Q/K row permutation is
undone here; fused projections are resolved through the model's `packed_modules_mapping`.
"""

from __future__ import annotations

import dataclasses
import functools
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
    gguf_file = None
    if ref.format == "gguf":
        from hearth.loader.gguf import open_gguf

        gguf_file = open_gguf(ref.path)
    fed: dict[nn.Module, list[torch.Tensor]] = {}  # what each module was given, to unmap once it no longer reads it
    cache = _RepackCacheUse(gguf_file, ref, model, dtype)
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
        fed.setdefault(module, []).append(tensor)
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
    released = 0
    # modules given parts of a tensor that was fed to a module above them (DeepSeek's experts, split from one stacked
    # tensor per kind): each one's own rows are unmapped as soon as it is finalized, not only with the whole tensor
    split = {sub for m in fed if not hasattr(m, "finalize") for sub in m.modules() if sub is not m}
    for mod_name, module in reversed(list(model.named_modules())):  # children before parents
        if hasattr(module, "finalize"):
            cache.before(mod_name, module)
            parts = _model_tensors(module) if gguf_file is not None and module in split else []
            try:
                module.finalize(dtype, keep_quantized)
            except ValueError as e:
                raise ModelLoadError(ref.path, f"module {mod_name!r}: {e}") from None
            cache.after(mod_name, module)
            if parts:
                keep = gguf_file.mapped_ranges(_model_tensors(module))
                released += gguf_file.release(gguf_file.mapped_ranges(parts, own_bytes=True), keep=keep)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and (mod_name, "weight") not in loaded:
            raise ModelLoadError(ref.path, f"missing tensor {mod_name}.weight")
        # What it (or its submodules, all finalized by now: e.g. DeepSeek's stacked experts, split among the experts'
        # Linears) copied or repacked no longer needs the file's pages: unmapping them here keeps the load's peak low
        if gguf_file is not None and module in fed:
            released += _release(gguf_file, module, fed.pop(module))
    if gguf_file is not None:  # copied weights (plain parameters) no longer read the map either
        held = gguf_file.mapped_ranges(_model_tensors(model))
        released += _release(gguf_file, model, [t for ts in fed.values() for t in ts], keep=held)
        # weights kept as views (a Q8_0 file's blocks, which the kernels read in place): read ahead into the page
        # cache, mapped as they are first read
        gguf_file.read_ahead(held)
    note = cache.finish()
    logger.info("loaded %s in %.1fs%s", ref.path, time.perf_counter() - start, note)
    if released:
        logger.debug("unmapped %.2f GB of the file that was copied or repacked", released / 1e9)


class _RepackCacheUse:
    """One load's use of the repack cache (loader/repack_cache.py): modules with `use_repacked` get their weights
    from a valid cache before `finalize`; if any had to repack, every module's `repacked_state()` is written as the
    new cache at the end."""

    def __init__(self, gguf_file, ref: ModelRef, model: nn.Module, dtype: torch.dtype):
        from hearth.loader import repack_cache

        self.cache, self.key, self.state, self.stale, self.hits = None, None, {}, False, 0
        self.ref = ref
        if gguf_file is None or not repack_cache.enabled() or not any(hasattr(m, "use_repacked") for m in model.modules()):
            return
        from hearth.layers.distributed import get_tensor_parallel

        tp = get_tensor_parallel()  # a rank repacks only its experts: its share has a cache of its own
        shard = f".rank{tp.rank}-of-{tp.size}" if tp.size > 1 else ""
        self.key = repack_cache.cache_key(gguf_file.paths, gguf_file.header_bytes(), dtype, shard)
        self.cache = repack_cache.open_cache(ref.path, self.key)
        self.stale = self.cache is None

    def before(self, name: str, module: nn.Module) -> None:
        if self.cache is None or not hasattr(module, "use_repacked"):
            return
        prefix = name + "."
        state = {k.removeprefix(prefix): v for k, v in self.cache.tensors.items() if k.startswith(prefix)}
        if not module.use_repacked(state):
            self.stale = True

    def after(self, name: str, module: nn.Module) -> None:
        if self.key is None or not hasattr(module, "repacked_state"):
            return
        state = module.repacked_state()
        if getattr(module, "from_cache", False):
            self.hits += 1
        elif state:
            self.stale = True
        self.state.update({f"{name}.{k}": v for k, v in state.items()})

    def finish(self) -> str:
        """Writes the cache if it was missing or stale; a note for the load's log line."""
        from hearth.loader import repack_cache

        if self.cache is not None and set(self.cache.tensors) != set(self.state):
            self.stale = True
        if self.key is None or not self.state:
            return ""
        if not self.stale:
            return f" (repacked weights of {self.hits} layers mapped from the repack cache {self.cache.path})"
        path = repack_cache.write_cache(self.ref.path, self.key, self.state)
        return f" (weights repacked; repack cache written to {path})" if path else " (weights repacked; no cache)"


def _release(gguf_file, model: nn.Module, tensors: list[torch.Tensor], keep=None) -> int:
    """Unmap the pages of `tensors` (views of the GGUF file) that no weight of `model` still views (a module's tensors
    went to it alone, so once it is finalized only it can view them); `keep`: those views' ranges, if known."""
    ranges = gguf_file.mapped_ranges(t for x in tensors for t in _tensors(x))
    if not ranges:
        return 0
    return gguf_file.release(ranges, keep=gguf_file.mapped_ranges(_model_tensors(model)) if keep is None else keep)


# what every nn.Module keeps in its __dict__ besides its parameters and buffers (hooks, flags): never a weight
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"_parameters", "_buffers"}


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module of `model` holds: parameters, buffers, and attributes (dataclasses, dicts, lists of them;
    loaded tensors a module keeps for its finalize included). A load walks its modules several times (thousands of
    expert Linears in a DeepSeek file), so this is a plain loop that skips the Module internals and scalars."""
    out: list[torch.Tensor] = []
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS and type(value) not in _SCALARS:
                _collect(value, out)
    return out


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


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields of a dataclass type (QuantizedTensor, R16Weight, a LinearMethod, ...), None for other types: a load
    walks its model's tensors many times, and `dataclasses.fields` each time was a visible share of it."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


_SCALARS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device})


def _collect(value, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif type(value) in _SCALARS:
        return
    elif (names := _field_names(type(value))) is not None:
        for name in names:
            _collect(getattr(value, name), out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, out)
    elif isinstance(value, (list, tuple)):  # e.g. the shards of a GGUF weight read in place
        for v in value:
            _collect(v, out)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in `value` (a tensor, or dataclasses, dicts, lists and tuples holding them)."""
    out: list[torch.Tensor] = []
    _collect(value, out)
    return out


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
