"""Fuzz the GGUF header reader: thousands of corrupted files (truncations, bit flips, huge counts and lengths) must
each open or fail with ModelLoadError, never another exception, and never allocate more than a few MiB."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hearth.loader import ModelLoadError
from hearth.loader.gguf import _open_cached, open_gguf

MAX_TRACED_BYTES = 16 << 20  # the valid file is ~2 KiB; nothing it claims may make the reader allocate more
SETTINGS = settings(max_examples=700, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def build_valid(path) -> bytes:
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_string("general.name", "fuzz")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 0.5, 1.0, 1.5])
    writer.add_uint32("general.alignment", 32)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16), raw_dtype=GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def field_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type and offset field in the header, found by walking it."""
    out = [(8, 8), (16, 8), (4, 4)]
    pos = 24
    num_tensors, num_kv = struct.unpack_from("<QQ", data, 8)

    def string() -> None:
        nonlocal pos
        out.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    def value(vtype: int) -> None:
        nonlocal pos
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype in sizes:
            pos += sizes[vtype]
        elif vtype == 8:
            string()
        else:
            out.append((pos, 4))
            out.append((pos + 4, 8))
            elem, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                value(elem)

    for _ in range(num_kv):
        string()
        out.append((pos, 4))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        value(vtype)
    for _ in range(num_tensors):
        string()
        out.append((pos, 4))
        (num_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        for d in range(num_dims):
            out.append((pos + 8 * d, 8))
        pos += 8 * num_dims
        out += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return out


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, list[tuple[int, int]]]:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    data = build_valid(path)
    open_gguf(path, check_types=False)  # the unmutated file opens
    return data, field_offsets(data)


def check_opens_or_fails_cleanly(path, data: bytes) -> None:
    path.write_bytes(data)
    _open_cached.cache_clear()  # the cache keys on (path, mtime, size): a rewrite of the same size may hit it
    tracemalloc.start()
    try:
        open_gguf(path, check_types=False)
        open_gguf(path, check_types=True)
    except ModelLoadError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        _open_cached.cache_clear()
    assert peak < MAX_TRACED_BYTES, f"{peak} bytes traced"


def test_every_truncation_fails_cleanly(valid, tmp_path):
    """Cut anywhere before the end of the last tensor's data (only alignment padding may go)."""
    data, _ = valid
    path = tmp_path / "t.gguf"
    path.write_bytes(data)
    data_end = max(info.offset + info.nbytes for info in open_gguf(path, check_types=False).tensor_infos)
    for n in range(data_end):
        path.write_bytes(data[:n])
        _open_cached.cache_clear()
        with pytest.raises(ModelLoadError):
            open_gguf(path, check_types=False)


@SETTINGS
@given(st.data())
def test_bit_flips(valid, tmp_path, data):
    raw, fields = valid
    header_end = max(o + s for o, s in fields)
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header_end - 1))  # the header: the tensor bytes are opaque data
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    check_opens_or_fails_cleanly(tmp_path / "f.gguf", bytes(buf))


HUGE = st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1])


@SETTINGS
@given(st.data())
def test_huge_counts_lengths_and_offsets(valid, tmp_path, data):
    raw, fields = valid
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        offset, size = data.draw(st.sampled_from(fields))
        value = data.draw(st.one_of(HUGE, st.integers(0, 2**64 - 1)))
        buf[offset : offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    check_opens_or_fails_cleanly(tmp_path / "h.gguf", bytes(buf))


@SETTINGS
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_after_a_valid_preamble(tmp_path, tail):
    head = struct.pack("<4sIQQ", b"GGUF", 3, 1, 2)
    check_opens_or_fails_cleanly(tmp_path / "r.gguf", head + tail)


def test_deeply_nested_arrays_fail_cleanly(tmp_path):
    depth = 100_000
    data = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 1) + b"\0" * 4
    path = tmp_path / "nested.gguf"
    path.write_bytes(data)
    _open_cached.cache_clear()
    with pytest.raises(ModelLoadError):
        open_gguf(path, check_types=False)
