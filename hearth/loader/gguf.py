"""GGUF files → metadata and memory-mapped tensors (layout: docs/models.md §4.1).

One bounds-checked walk of the header parses everything: metadata as plain Python values and the tensor infos, so a
corrupt file fails with one clear line instead of an exception (or an unbounded allocation) deep inside a parser.
The file is mapped once, copy-on-write; tensors are views of that map, never copied or dequantized here.

A split model (`NAME-00001-of-00003.gguf`, as llama.cpp's gguf-split writes it) opens from any of its parts: each part
is a GGUF file of its own whose metadata says `split.no` (0-based) and `split.count`; the first also holds the model's
metadata and `split.tensors.count`, the total over all parts. Every part is mapped and checked, and the tensors of all
parts form one table (docs/models.md §4.1).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import mmap
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from hearth.loader import ModelLoadError
from hearth.quant.gguf_types import FLOAT_TYPES, SUPPORTED_TYPES, QuantizedTensor, row_nbytes, type_name

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
MAX_ARRAY_NESTING = 8  # real files nest at most once (arrays of arrays); deeper is corruption
# GGUFValueType → little-endian element format (struct and numpy spell these the same way)
SCALAR_FORMATS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                  12: "<f8"}  # fmt: skip
SCALAR_STRUCTS = {t: struct.Struct("<" + c) for t, c in zip(SCALAR_FORMATS, "BbHhIif?Qqd", strict=True)}
SCALAR_SIZES = {t: s.size for t, s in SCALAR_STRUCTS.items()}
STRING, ARRAY, FLOAT32, UINT32 = (int(t) for t in (GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.FLOAT32,
                                                   GGUFValueType.UINT32))  # fmt: skip
U64 = struct.Struct("<Q")
SPLIT_NAME_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@dataclass(slots=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: reversed GGUF dims, e.g. (out, in)
    nbytes: int
    offset: int  # absolute byte offset of the data in the file
    part: int = 0  # which file of a split model holds it (0: the first, or the only one)

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class _Parser:
    """Parses the GGUF header with bounds checks: metadata values, `general.alignment` and tensor infos."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(self.path, reason)

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes < 0 or self.pos + num_bytes > self.size:
            raise self.fail(f"truncated or corrupt file: {what} at byte {self.pos} runs past the end ({self.size} bytes)")

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def raw_string(self, what: str) -> bytes:
        (length,) = self.take("<Q", what)
        self.need(length, what)
        self.pos += length
        return self.buf[self.pos - length : self.pos]

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from None

    def strings(self, count: int, key: str) -> list[str]:
        """`count` strings from here: the hot loop of vocabularies (150k tokens and merges), so slices, then decode."""
        buf, pos, size, unpack, raw = self.buf, self.pos, self.size, U64.unpack_from, []
        append = raw.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of string {i} of array {key!r}")
            (length,) = unpack(buf, pos)
            pos += 8
            if pos + length > size:
                self.pos = pos
                self.need(length, f"string {i} of array {key!r}")
            append(buf[pos : pos + length])
            pos += length
        self.pos = pos
        try:
            return [s.decode("utf-8") for s in raw]
        except UnicodeDecodeError as e:
            raise self.fail(f"metadata string in {key!r} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
        if vtype in SCALAR_STRUCTS:
            (value,) = self.take(SCALAR_STRUCTS[vtype].format, f"value of {key!r}")
            return value
        if vtype == STRING:
            raw = self.raw_string(f"value of {key!r}")
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.fail(f"metadata string in {key!r} is not valid UTF-8 ({e})") from None
        if vtype == ARRAY:
            elem_type, count = self.take("<IQ", f"array header of {key!r}")
            if count == 0:
                return []
            min_size = SCALAR_SIZES.get(elem_type, 8 if elem_type == STRING else 12)
            self.need(count * min_size, f"array {key!r} of {count} elements")
            if elem_type in SCALAR_FORMATS:
                values = np.frombuffer(self.buf, SCALAR_FORMATS[elem_type], count, self.pos).tolist()
                self.pos += count * min_size
                return values
            if elem_type == STRING:
                return self.strings(count, key)
            flat: list[Any] = []  # arrays of arrays come back flattened, as gguf.GGUFReader's contents() gives them
            for _ in range(count):
                flat += self.value(elem_type, key, depth + 1)  # an array (any other type raised)
            return flat
        raise self.fail(f"metadata key {key!r} has unknown value type {vtype}")

    def parse(self, num_kv: int, num_tensors: int) -> tuple[dict[str, Any], list[TensorInfo], int]:
        metadata: dict[str, Any] = {}
        alignment = DEFAULT_ALIGNMENT
        for _ in range(num_kv):
            key = self.text("metadata key")
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            (vtype,) = self.take("<I", f"type of {key!r}")
            value = self.value(vtype, key)
            if vtype == FLOAT32:
                value = float(str(np.float32(value)))  # shortest decimal that round-trips, e.g. 1e-05 not 9.99999974e-06
            if key == "general.alignment":
                if vtype != UINT32:
                    raise self.fail(f"general.alignment has value type {vtype}, not UINT32")
                if value == 0 or value & (value - 1):
                    raise self.fail(f"general.alignment {value} is not a power of two")
                alignment = value
            if not key.startswith("GGUF."):  # gguf.GGUFReader's own pseudo-keys; never model metadata
                metadata[key] = value
        raw_infos = []
        for _ in range(num_tensors):
            name = self.text("tensor name")
            (num_dims,) = self.take("<I", f"dimensions of tensor {name!r}")
            if not 1 <= num_dims <= MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {num_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = self.take(f"<{num_dims}Q", f"shape of tensor {name!r}")
            ggml_type, offset = self.take("<IQ", f"type and offset of tensor {name!r}")
            raw_infos.append((name, dims, ggml_type, offset))
        data_start = -(-self.pos // alignment) * alignment
        infos, names = [], set()
        for name, dims, ggml_type, offset in raw_infos:
            if name in names:
                raise self.fail(f"duplicate tensor {name!r}")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(ggml_type)
            except ValueError:
                raise self.fail(f"tensor {name!r} has unknown GGML type id {ggml_type}") from None
            shape = tuple(reversed(dims))
            try:
                nbytes = row_nbytes(qtype, shape[-1]) * math.prod(shape[:-1])
            except ValueError as e:
                raise self.fail(f"tensor {name!r}: {e}") from None
            if offset % alignment:
                raise self.fail(f"tensor {name!r} data offset {offset} is not a multiple of the file's alignment "
                                f"({alignment}): corrupt")  # fmt: skip
            end = data_start + offset + nbytes
            if end > self.size:
                raise self.fail(f"tensor {name!r} data ends at byte {end}, past the end of the file "
                                f"({self.size} bytes): truncated or corrupt")  # fmt: skip
            infos.append(TensorInfo(name, int(qtype), shape, nbytes, data_start + offset))
        by_offset = sorted((info for info in infos if info.nbytes), key=lambda info: info.offset)
        for prev, info in zip(by_offset, by_offset[1:]):  # each tensor owns its bytes: an overlap is corruption
            if info.offset < prev.offset + prev.nbytes:
                raise self.fail(f"tensors {prev.name!r} and {info.name!r} overlap in the data section (bytes "
                                f"{info.offset} to {prev.offset + prev.nbytes}): corrupt")  # fmt: skip
        return metadata, infos, data_start


def _parse(path: str, buf: mmap.mmap) -> tuple[int, dict[str, Any], list[TensorInfo], int]:
    """Validate and parse the whole header without trusting any count; (version, metadata, tensor infos, data start)."""
    file_size = len(buf)
    magic, version, num_tensors, num_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, f"not a GGUF file (bad magic {magic!r})")
    if version & 0xFFFF == 0:
        raise ModelLoadError(path, "big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    if num_kv * MIN_KV_BYTES > file_size or num_tensors * MIN_TENSOR_INFO_BYTES > file_size:
        claims = f"{num_tensors} tensors and {num_kv} metadata keys"
        raise ModelLoadError(path, f"truncated or corrupt header: claims {claims}, more than a {file_size}-byte "
                                   "file can hold")  # fmt: skip
    parser = _Parser(buf, path)
    parser.pos = 24
    metadata, infos, data_start = parser.parse(num_kv, num_tensors)
    return version, metadata, infos, data_start


MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module does not name it


def populate_map(buf: mmap.mmap) -> None:
    """Read a whole map into memory now (MADV_POPULATE_READ), so that a load, not the first request, pays for reading
    it; on older kernels, ask for it to be read ahead (MADV_WILLNEED)."""
    if sys.platform != "linux":
        return
    try:
        buf.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            buf.madvise(mmap.MADV_WILLNEED)


def coalesce_ranges(ranges: list[tuple[int, int, int]], page: int) -> list[tuple[int, int, int]]:
    """(part, start, end) ranges sorted, their starts rounded down to a page, and those that overlap or lie within a
    page of each other in one part joined."""
    runs: list[list[int]] = []
    for part, start, end in sorted(ranges):
        if runs and runs[-1][0] == part and start <= runs[-1][2] + page:
            runs[-1][2] = max(runs[-1][2], end)
        else:
            runs.append([part, start // page * page, end])
    return [(part, start, end) for part, start, end in runs]


class GGUFFile:
    """An open GGUF file: plain-Python `metadata`, `tensor_infos`, and `iter_tensors()` over memory-mapped data."""

    def __init__(self, path: str, version: int, metadata: dict[str, Any], infos: list[TensorInfo],
                 buf: mmap.mmap | list[mmap.mmap], paths: list[str] | None = None):  # fmt: skip
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensor_infos = infos
        # copy-on-write maps, one per part of a split model: tensors are writable views, and the files are never modified
        self._bufs = buf if isinstance(buf, list) else [buf]
        self.paths = paths or [path]  # every part's path, in order
        self.file_size = sum(len(b) for b in self._bufs)
        self._span_cache: list[tuple[int, int]] | None = None

    def header_bytes(self) -> bytes:
        """Every part's bytes before its first tensor's data: magic, metadata and tensor table."""
        out = b""
        for part, buf in enumerate(self._bufs):
            offsets = [t.offset for t in self.tensor_infos if t.part == part]
            out += buf[: min(offsets, default=len(buf))]
        return out

    def _spans(self) -> list[tuple[int, int]]:
        """(address, length) of each part's map (learned once: a load asks for them for every module)."""
        if self._span_cache is None:
            spans = []
            for buf in self._bufs:
                probe = torch.frombuffer(buf, dtype=torch.uint8, count=1)  # the map's first byte, to learn its address
                spans.append((probe.data_ptr(), len(buf)))
            self._span_cache = spans
        return self._span_cache

    def mapped_ranges(self, tensors, own_bytes: bool = False) -> list[tuple[int, int, int]]:
        """(part, start, end) byte offsets in the maps of those of `tensors` that are views of them (others ignored):
        their whole storage, or with `own_bytes` only the bytes of each (contiguous) tensor itself, e.g. one expert's
        rows of a stacked tensor."""
        spans, out = self._spans(), []
        for t in tensors:
            if own_bytes and t.is_contiguous():
                ptr, size = t.data_ptr(), t.numel() * t.element_size()
            else:
                ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            for part, (base, length) in enumerate(spans):
                if base <= ptr < base + length:
                    out.append((part, ptr - base, min(ptr - base + size, length)))
                    break
        return out

    def read_ahead(self, ranges: list[tuple[int, int, int]]) -> threading.Thread | None:
        """Ask the kernel to read the pages of `ranges` into the page cache (MADV_WILLNEED), without mapping them into
        this process: a weight's pages are then mapped as the kernels first read them, as a map of the file is in
        llama.cpp. Mapping them all up front (MADV_POPULATE_READ) cost ~1 s of system time per GB on a 2-core VM,
        which a load would wait for or a first request would compete with. The hints (one per run of adjacent
        ranges) are given from a daemon thread, returned, through libc's madvise, which runs without the GIL: even
        from a warm page cache they take ~0.5 s for a 16.7 GB file."""
        if sys.platform != "linux" or not ranges:
            return None
        spans, bufs = self._spans(), list(self._bufs)
        runs = coalesce_ranges(ranges, mmap.PAGESIZE)

        def hint() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            for part, start, end in runs:
                libc.madvise(spans[part][0] + start, end - start, mmap.MADV_WILLNEED)
            bufs.clear()  # held until here, so the maps outlive the hints

        thread = threading.Thread(target=hint, name="hearth-read-ahead", daemon=True)
        thread.start()
        return thread

    def release(self, ranges: list[tuple[int, int, int]], keep: list[tuple[int, int, int]] = ()) -> int:
        """Unmap the whole pages of `ranges` (from `mapped_ranges`) from this process (Linux MADV_DONTNEED) once what
        they held was copied or repacked, keeping the load's peak resident memory low; a range overlapping one of
        `keep` (still viewed) is left alone. The pages stay in the page cache (the next load reads them from memory)
        and an access would fault them back from the file. Returns the bytes released."""
        if sys.platform != "linux" or not ranges:
            return 0
        page = mmap.PAGESIZE
        released = 0
        for part, start, end in ranges:
            if any(p == part and s < end and start < e for p, s, e in keep):
                continue
            first, last = -(-start // page) * page, end // page * page
            if last > first:
                with contextlib.suppress(OSError, ValueError):
                    self._bufs[part].madvise(mmap.MADV_DONTNEED, first, last - first)
                    released += last - first
        return released

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(self.path, "metadata has no general.architecture")
        return arch

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(GGUF name, tensor) in file order: F32/F16/BF16 as torch views of the file, others as QuantizedTensor."""
        for info in self.tensor_infos:
            if info.ggml_type not in SUPPORTED_TYPES:
                raise ModelLoadError(self.path, f"tensor {info.name!r} has unsupported type {info.type_name}")
            yield info.name, self._tensor(info)

    def _tensor(self, info: TensorInfo) -> torch.Tensor | QuantizedTensor:
        if info.nbytes:  # a storage of exactly this tensor's bytes; it keeps the map alive
            data = torch.frombuffer(self._bufs[info.part], dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        else:
            data = torch.empty(0, dtype=torch.uint8)
        if info.ggml_type in FLOAT_TYPES:
            return data.view(FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
        rows = math.prod(info.shape[:-1])
        return QuantizedTensor(data.view(rows, row_nbytes(info.ggml_type, info.shape[-1])), info.ggml_type, info.shape)


def open_gguf(path: str | os.PathLike[str], *, check_types: bool = True) -> GGUFFile:
    """Open and validate a GGUF file; raise ModelLoadError with a one-line reason if it cannot be used.

    `check_types=False` accepts tensor types Hearth cannot compute with (for `hearth show`). The config, tokenizer and
    weights of one model all come from the same file, so the last few opened files are kept.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(path, "not a file" if os.path.exists(path) else "no such file")
    st = os.stat(path)
    g = _open_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size, path)
    if check_types:
        for info in g.tensor_infos:  # names the first tensor of an unsupported type
            if info.ggml_type not in SUPPORTED_TYPES:
                raise ModelLoadError(path, f"tensor {info.name!r} has unsupported type {info.type_name} (supported: "
                                           f"{', '.join(t.name for t in SUPPORTED_TYPES)})")  # fmt: skip
    return g


def _map(path: str, size: int) -> tuple[mmap.mmap, int, dict[str, Any], list[TensorInfo]]:
    """One file mapped and parsed: (map, version, metadata, tensor infos)."""
    if size < 24:
        with open(path, "rb") as f:
            magic = f.read(4)
        raise ModelLoadError(path, "not a GGUF file (bad magic)" if magic != GGUF_MAGIC[: len(magic)] else
                             f"truncated file: {size} bytes is smaller than a GGUF header")  # fmt: skip
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # stays open after f closes, for the tensors
    try:
        version, metadata, infos, _ = _parse(path, buf)
    except BaseException:
        with contextlib.suppress(BufferError):
            buf.close()  # nothing views it yet
        raise
    return buf, version, metadata, infos


def split_parts(path: str, metadata: dict[str, Any]) -> list[str] | None:
    """The paths of every part of a split model, in order, from one part's path and metadata; None when not split."""
    count = metadata.get("split.count")
    if count is None or count == 1:
        return None
    folder, name = os.path.split(path)
    m = SPLIT_NAME_RE.match(name)
    if not isinstance(count, int) or count < 1:
        raise ModelLoadError(path, f"split.count is {count!r}: corrupt")
    if m is None:
        raise ModelLoadError(path, f"one part of a split model ({count} parts), but its name does not say which "
                                   "(NAME-00001-of-0000N.gguf)")  # fmt: skip
    if int(m[3]) != count:
        raise ModelLoadError(path, f"named as one of {int(m[3])} parts, but its metadata says {count}")
    return [os.path.join(folder, f"{m[1]}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _open_split(path: str, parts: list[str]) -> GGUFFile:
    """All parts of a split model as one GGUFFile: the first part's metadata, every part's tensors."""
    bufs: list[mmap.mmap] = []
    infos: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    version = 0
    try:
        for i, part in enumerate(parts):
            if not os.path.isfile(part):
                raise ModelLoadError(path, f"part {i + 1} of {len(parts)} of this split model is missing: {part}")
            buf, v, meta, part_infos = _map(part, os.path.getsize(part))
            bufs.append(buf)
            if meta.get("split.no") != i or meta.get("split.count") != len(parts):
                raise ModelLoadError(part, f"expected part {i + 1} of {len(parts)} (split.no {i}), but its metadata says "
                                           f"split.no {meta.get('split.no')!r} of {meta.get('split.count')!r}")  # fmt: skip
            if i == 0:
                version, metadata = v, {k: x for k, x in meta.items() if not k.startswith("split.")}
                expected = meta.get("split.tensors.count")
            infos += [TensorInfo(t.name, t.ggml_type, t.shape, t.nbytes, t.offset, i) for t in part_infos]
        names = set()
        for info in infos:
            if info.name in names:
                raise ModelLoadError(path, f"tensor {info.name!r} is in more than one part of this split model")
            names.add(info.name)
        if expected is not None and expected != len(infos):
            raise ModelLoadError(path, f"split.tensors.count says {expected} tensors, but the {len(parts)} parts hold "
                                       f"{len(infos)}: a part is missing or corrupt")  # fmt: skip
    except BaseException:
        for buf in bufs:
            with contextlib.suppress(BufferError):
                buf.close()
        raise
    logger.debug("opened %s: split GGUF v%d, %d parts, %d tensors", path, version, len(parts), len(infos))
    return GGUFFile(parts[0], version, metadata, infos, bufs, parts)


@functools.lru_cache(maxsize=2)
def _open_cached(realpath: str, mtime_ns: int, size: int, path: str) -> GGUFFile:
    buf, version, metadata, infos = _map(path, size)
    parts = split_parts(path, metadata)
    if parts is not None:
        with contextlib.suppress(BufferError):
            buf.close()
        return _open_split(path, parts)
    logger.debug("opened %s: GGUF v%d, %d tensors, %d keys", path, version, len(infos), len(metadata))
    return GGUFFile(path, version, metadata, infos, buf)
