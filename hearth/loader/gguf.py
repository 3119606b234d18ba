"""GGUF files → metadata and memory-mapped tensors, on top of `gguf.GGUFReader` (layout: MODELS.md §4.1).

A bounds-checking walk of the header runs first, so a corrupt file fails with one clear line instead of an
exception (or an unbounded allocation) deep inside the reader. Tensor data is never copied or dequantized here.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from hearth.loader import ModelLoadError
from hearth.quant.gguf_types import FLOAT_TYPES, SUPPORTED_TYPES, QuantizedTensor, row_nbytes, type_name

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType → bytes
STRING, ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)


@dataclass(slots=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: reversed GGUF dims, e.g. (out, in)
    nbytes: int
    offset: int  # absolute byte offset of the data in the file

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


MAX_ARRAY_NESTING = 8  # real files nest at most once (arrays of arrays); deeper is corruption


class _HeaderScan:
    """Walks the GGUF header with bounds checks; reads only keys, `general.alignment` and tensor infos."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, reason: str) -> ModelLoadError:
        return ModelLoadError(self.path, reason)

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes < 0 or self.pos + num_bytes > len(self.buf):
            end = len(self.buf)
            raise self.fail(f"truncated or corrupt file: {what} at byte {self.pos} runs past the end ({end} bytes)")

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self, what: str) -> bytes:
        (length,) = self.take("<Q", what)
        self.need(length, what)
        self.pos += length
        return self.buf[self.pos - length : self.pos]

    def skip_value(self, vtype: int, key: str, depth: int = 0) -> None:
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
        if vtype in SCALAR_SIZES:
            self.need(SCALAR_SIZES[vtype], f"value of {key!r}")
            self.pos += SCALAR_SIZES[vtype]
        elif vtype == STRING:
            self.string(f"value of {key!r}")
        elif vtype == ARRAY:
            elem_type, count = self.take("<IQ", f"array header of {key!r}")
            min_size = SCALAR_SIZES.get(elem_type, 8 if elem_type == STRING else 12)
            self.need(count * min_size, f"array {key!r} of {count} elements")
            if elem_type in SCALAR_SIZES:
                self.pos += count * min_size
            else:
                for _ in range(count):
                    self.skip_value(elem_type, key, depth + 1)
        else:
            raise self.fail(f"metadata key {key!r} has unknown value type {vtype}")

    def scan(self, num_kv: int, num_tensors: int, check_types: bool) -> tuple[list[TensorInfo], int]:
        alignment = DEFAULT_ALIGNMENT
        for _ in range(num_kv):
            key = self.string("metadata key").decode("utf-8", errors="replace")
            (vtype,) = self.take("<I", f"type of {key!r}")
            value_pos = self.pos
            self.skip_value(vtype, key)
            if key == "general.alignment" and vtype == int(GGUFValueType.UINT32):
                (alignment,) = struct.unpack_from("<I", self.buf, value_pos)
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.fail(f"general.alignment {alignment} is not a power of two")
        raw_infos = []
        for _ in range(num_tensors):
            name = self.string("tensor name").decode("utf-8", errors="replace")
            (num_dims,) = self.take("<I", f"dimensions of tensor {name!r}")
            if not 1 <= num_dims <= MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {num_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = self.take(f"<{num_dims}Q", f"shape of tensor {name!r}")
            ggml_type, offset = self.take("<IQ", f"type and offset of tensor {name!r}")
            raw_infos.append((name, dims, ggml_type, offset))
        data_start = -(-self.pos // alignment) * alignment
        infos = []
        for name, dims, ggml_type, offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(ggml_type)
            except ValueError:
                raise self.fail(f"tensor {name!r} has unknown GGML type id {ggml_type}") from None
            if check_types and qtype not in SUPPORTED_TYPES:
                raise self.fail(f"tensor {name!r} has unsupported type {qtype.name} (supported: "
                                f"{', '.join(t.name for t in SUPPORTED_TYPES)})")  # fmt: skip
            shape = tuple(reversed(dims))
            try:
                nbytes = row_nbytes(qtype, shape[-1]) * math.prod(shape[:-1])
            except ValueError as e:
                raise self.fail(f"tensor {name!r}: {e}") from None
            end = data_start + offset + nbytes
            if end > len(self.buf):
                raise self.fail(f"tensor {name!r} data ends at byte {end}, past the end of the file "
                                f"({len(self.buf)} bytes): truncated or corrupt")  # fmt: skip
            infos.append(TensorInfo(name, int(qtype), shape, nbytes, data_start + offset))
        return infos, data_start


def _check_header(path: str, check_types: bool) -> tuple[int, list[TensorInfo], int]:
    """Validate the whole header without trusting any count; returns (version, tensor infos, data start)."""
    file_size = os.path.getsize(path)
    if file_size < 24:
        with open(path, "rb") as f:
            magic = f.read(4)
        raise ModelLoadError(path, "not a GGUF file (bad magic)" if magic != GGUF_MAGIC[: len(magic)] else
                             f"truncated file: {file_size} bytes is smaller than a GGUF header")  # fmt: skip
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
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
        scan = _HeaderScan(buf, path)
        scan.pos = 24
        infos, data_start = scan.scan(num_kv, num_tensors, check_types)
    return version, infos, data_start


def _field_value(field: Any) -> Any:
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) == 1:
        return []  # empty array: the reader records no element type
    value = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))  # shortest decimal that round-trips, e.g. 1e-05 not 9.99999974e-06
    return value


class GGUFFile:
    """An open GGUF file: plain-Python `metadata`, `tensor_infos`, and `iter_tensors()` over memory-mapped data."""

    def __init__(self, path: str, version: int, infos: list[TensorInfo], reader: GGUFReader):
        self.path = path
        self.version = version
        self.tensor_infos = infos
        self.file_size = os.path.getsize(path)
        self._reader = reader
        try:
            self.metadata: dict[str, Any] = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        except UnicodeDecodeError as e:
            raise ModelLoadError(path, f"metadata string is not valid UTF-8 ({e})") from None

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(self.path, "metadata has no general.architecture")
        return arch

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(GGUF name, tensor) in file order: F32/F16/BF16 as torch views of the file, others as QuantizedTensor."""
        for info, rt in zip(self.tensor_infos, self._reader.tensors, strict=True):
            if info.ggml_type not in SUPPORTED_TYPES:
                raise ModelLoadError(self.path, f"tensor {info.name!r} has unsupported type {info.type_name}")
            data = torch.from_numpy(rt.data)
            if info.ggml_type in FLOAT_TYPES:
                yield info.name, data.view(FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
            else:
                yield info.name, QuantizedTensor(data.reshape(-1, data.shape[-1]), info.ggml_type, info.shape)


def open_gguf(path: str | os.PathLike[str], *, check_types: bool = True) -> GGUFFile:
    """Open and validate a GGUF file; raise ModelLoadError with a one-line reason if it cannot be used.

    `check_types=False` accepts tensor types Hearth cannot compute with (for `hearth show`). The config, tokenizer and
    weights of one model all come from the same file, so the last few opened files are kept (parsing takes seconds).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(path, "not a file" if os.path.exists(path) else "no such file")
    if check_types:
        _check_header(path, check_types=True)  # a quick scan; names the first tensor of an unsupported type
    st = os.stat(path)
    return _open_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size, path)


@functools.lru_cache(maxsize=2)
def _open_cached(realpath: str, mtime_ns: int, size: int, path: str) -> GGUFFile:
    version, infos, data_start = _check_header(path, check_types=False)
    try:
        reader = GGUFReader(path, mode="c")  # copy-on-write map: writable tensors, the file is never modified
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... on corrupt input
        raise ModelLoadError(path, f"corrupt GGUF file: {type(e).__name__}: {e}") from None
    if reader.data_offset != data_start or len(reader.tensors) != len(infos):
        raise ModelLoadError(path, "corrupt GGUF file: inconsistent header")
    logger.debug("opened %s: GGUF v%d, %d tensors, %d keys", path, version, len(infos), len(reader.fields))
    return GGUFFile(path, version, infos, reader)
