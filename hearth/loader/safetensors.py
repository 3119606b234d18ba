"""HF safetensors checkpoints (single file or sharded with an index) → (name, tensor), one tensor at a time.

Pickle checkpoints (.bin/.pt/.pth) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from hearth.loader import ModelLoadError
from hearth.loader.resolve import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def safetensors_files(folder: str) -> list[str]:
    """The checkpoint's files: the shards named by the index, else `model.safetensors`, else all `*.safetensors`."""
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))  # unique, in first-seen order
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(index_path, f"invalid safetensors index: {e!r}") from None
        files = [os.path.join(folder, shard) for shard in shards]
        missing = [shard for shard, file in zip(shards, files, strict=True) if not os.path.isfile(file)]
        if missing:
            raise ModelLoadError(folder, f"missing {len(missing)} of {len(shards)} shards: {', '.join(missing[:3])}")
        return files
    if os.path.isfile(os.path.join(folder, SINGLE_NAME)):
        return [os.path.join(folder, SINGLE_NAME)]
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if files:
        return files
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise ModelLoadError(folder, "pickle checkpoints are refused because loading them runs code; "
                                     "convert to safetensors first")  # fmt: skip
    raise ModelLoadError(folder, "no safetensors weights found")


def iter_safetensors(folder: str, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) over every shard; each tensor is read when it is yielded, none that `skip` is true for."""
    for file in safetensors_files(folder):
        try:
            handle = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(file, f"corrupt safetensors file: {e}") from None
        with handle as f:
            names = f.keys()
            for name in names:
                if skip is not None and skip(name):
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise ModelLoadError(file, f"cannot read tensor {name!r}: {e}") from None
                yield name, tensor
