"""The repack cache: weights a layer rearranges at load (MXFP4 experts into the int8-activation kernel's R16 form), kept
in a file so that later loads map them instead of repacking (docs/models.md §4.4).

Written once, at the first load that repacks: beside the model when its folder is writable (`MODEL.gguf.hearth-repack`,
beside a symlink rather than its target), else under `$HEARTH_HOME/cache/repack/`; always through a temporary file
renamed into place, so a reader sees a whole file or none. A cache is used only when everything it was made from
matches: the model files' sizes and mtimes, a hash of their headers (metadata and tensor table), the repacked form's
layout version and the compute dtype; and when its own size and header are whole. Anything else (stale, truncated,
corrupt, another version) is ignored and rewritten. Opt-in: `HEARTH_REPACK_CACHE=1` (see `enabled`).

File: the magic `HEARTHRP`, a little-endian u64 header length, a JSON header (`key`, `tensors`: name -> dtype, shape,
offset, nbytes), then each tensor's bytes at a page-aligned offset (so tensors are views of one read-only map).
A hand-written format because the alternatives copy on read: what makes the cache fast is that the tensors are never
copied, only mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass, field

import torch

from hearth.loader.gguf import populate_map

logger = logging.getLogger(__name__)

MAGIC = b"HEARTHRP"
LAYOUT_VERSION = 1  # bump when any layer's repacked form changes
SUFFIX = ".hearth-repack"
ALIGN = 4096
MAX_HEADER = 16 << 20
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}  # fmt: skip


def enabled() -> bool:
    """Off unless HEARTH_REPACK_CACHE=1: mapped weights are file pages, which the kernel may drop when memory is
    short (and some VMs page out when idle) and read back from disk mid-decode, and beside the GGUF they double what
    the page cache must hold when another runtime reads the same file (docs/models.md §4.4); repacked experts in
    anonymous memory cannot be dropped."""
    return os.environ.get("HEARTH_REPACK_CACHE", "0").strip().lower() in ("1", "true", "yes", "on")


def cache_key(model_paths: list[str], header_bytes: bytes, dtype: torch.dtype, shard: str = "") -> dict:
    """What a cache must have been made from: the model's files (sizes, mtimes, a hash of the headers), the layout
    version, the compute dtype, and which tensor-parallel share (`shard`, "" for a whole model)."""
    stats = [os.stat(p) for p in model_paths]
    return {"model_sizes": [st.st_size for st in stats], "model_mtimes_ns": [st.st_mtime_ns for st in stats],
            "header_sha256": hashlib.sha256(header_bytes).hexdigest(), "layout_version": LAYOUT_VERSION,
            "dtype": str(dtype).removeprefix("torch."), "shard": shard}  # fmt: skip


def candidate_paths(model_path: str, shard: str = "") -> list[str]:
    """Where a cache of `model_path` may be: beside it, then under $HEARTH_HOME/cache/repack/. `shard` names one
    tensor-parallel rank's share (its experts), which has a file of its own."""
    from hearth.config import hearth_home

    real = os.path.realpath(model_path)
    tag = hashlib.sha256(real.encode()).hexdigest()[:16]
    beside = os.path.abspath(model_path) + shard + SUFFIX  # beside the name it was opened by (a symlink's own folder)
    home = os.path.join(hearth_home(), "cache", "repack", f"{os.path.basename(real)}-{tag}{shard}{SUFFIX}")
    return [beside, home]


@dataclass
class RepackCache:
    """A valid cache's tensors (views of its map), found by `open_cache`."""

    path: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0


def _read(path: str, key: dict, populate: bool = True) -> RepackCache | None:
    """The cache at `path` if it is whole and made from `key`, else None (with the reason at debug level); with
    `populate`, read into memory before returning."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise ValueError("not a repack cache")
            (length,) = struct.unpack("<Q", head[8:])
            if length > min(MAX_HEADER, size - 16):
                raise ValueError("header runs past the end")
            header = json.loads(f.read(length))
        if header.get("key") != key:
            raise ValueError("made from another model file, layout or dtype")
        specs = header["tensors"]
        end = max((s["offset"] + s["nbytes"] for s in specs.values()), default=16 + length)
        if end != size or header.get("size") != size:
            raise ValueError(f"size {size} bytes, expected {header.get('size')}")
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: the file is never written through it
        tensors = {}
        for name, s in specs.items():
            dtype, shape = DTYPES[s["dtype"]], tuple(int(d) for d in s["shape"])
            count = s["nbytes"] // dtype.itemsize
            if s["offset"] % ALIGN or s["offset"] < 16 + length or count != math.prod(shape):
                raise ValueError(f"tensor {name!r} has a bad offset or size")
            view = torch.frombuffer(buf, dtype=torch.uint8, count=s["nbytes"], offset=s["offset"]) if count else None
            tensors[name] = view.view(dtype).reshape(shape) if view is not None else torch.empty(shape, dtype=dtype)
        if populate:
            populate_map(buf)  # the load, not the first request, reads it
        return RepackCache(path, tensors, size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.debug("repack cache %s not used: %s", path, e)
        return None


def open_cache(model_path: str, key: dict) -> RepackCache | None:
    """The first valid cache of `model_path` made from `key`, or None."""
    if not enabled():
        return None
    for path in candidate_paths(model_path, key.get("shard", "")):
        if os.path.isfile(path):
            cache = _read(path, key)
            if cache is not None:
                return cache
            logger.info("ignoring the stale or damaged repack cache %s (it will be rewritten)", path)
    return None


def find_cache(model_path: str, shard: str = "") -> str | None:
    """The path of an existing cache file of `model_path` (not validated)."""
    return next((p for p in candidate_paths(model_path, shard) if os.path.isfile(p)), None)


def describe_cache(model_path: str, key: dict) -> str:
    """One line for `hearth show`: where the cache is and whether the next load can use it."""
    if not enabled():
        return "off (HEARTH_REPACK_CACHE=1 keeps the repacked experts in a file that later loads map)"
    path = find_cache(model_path)
    if path is None:
        return "none yet (written at the first bf16 load)"
    cache = _read(path, key, populate=False)
    if cache is None:
        return f"{path}: stale or damaged, rewritten at the next load"
    return f"{path} ({cache.nbytes / 1e9:.2f} GB, used by the next bf16 load)"


def write_cache(model_path: str, key: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """Write `tensors` as the cache of `model_path` (beside it, else under $HEARTH_HOME); the path, or None when no
    place could take it (logged, never raised: the cache only saves time)."""
    if not enabled() or not tensors:
        return None
    specs = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "nbytes": t.numel() * t.element_size()} for name, t in tensors.items()}  # fmt: skip
    header = {"key": key, "tensors": specs, "size": 0}
    # offsets depend on the header's length, which depends on the offsets' digits: fix the length with padding first
    length = len(json.dumps(header)) + 64 * (len(specs) + 2)
    end = 16 + length
    for s in specs.values():
        s["offset"] = _align(end)
        end = s["offset"] + s["nbytes"]
    header["size"] = end
    raw = json.dumps(header).encode()
    raw += b" " * (length - len(raw))
    for path in candidate_paths(model_path, key.get("shard", "")):
        folder = os.path.dirname(path)
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            if shutil.disk_usage(folder).free < header["size"] + (1 << 30):  # leave a GiB for everything else
                raise OSError(f"not enough free space for {header['size'] / 1e9:.1f} GB")
            tmp = _create_temp(folder)
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", length) + raw)
                for name, t in tensors.items():
                    f.seek(specs[name]["offset"])
                    if t.numel():
                        f.write(memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()))
                f.truncate(header["size"])
            os.replace(tmp, path)
            logger.info("wrote the repack cache %s (%.2f GB): later loads map it instead of repacking", path,
                        header["size"] / 1e9)  # fmt: skip
            return path
        except OSError as e:
            logger.info("cannot write the repack cache in %s: %s", folder, e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    return None


def _create_temp(folder: str) -> str:
    """A new private file in `folder` to write the cache into before it is renamed into place."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".hearth-repack-", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file the user writes (mkstemp's are private)
    return tmp


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
