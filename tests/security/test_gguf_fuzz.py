"""Fuzz the GGUF reader: thousands of corrupted headers (truncations, bit flips, huge counts and lengths) must each
open or fail with ModelLoadError, never another exception, and never allocate more than a few MiB; whole model files
with every metadata key and tensor offset mutated must load and generate or fail in one line, in bounded time."""

from __future__ import annotations

import json
import signal
import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf_models import deepseek2_spec, gpt_oss_spec, llama_spec, write_model  # tests/gguf_models.py
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


# ---- whole model files ------------------------------------------------------------------------------------------
# A tiny Llama, gpt-oss and DeepSeek-V2-like deepseek2 (tests/gguf_models.py), then mutated: every metadata key set to extreme
# values, every tensor offset misaligned, overlapping or past the end, truncations and bit flips. Each case must end
# within CASE_SECONDS in a one-line error (ModelLoadError; the tokenizer's own ValueError for a vocabulary it cannot
# build) or in a model that loads and generates.

CASE_SECONDS = 30
EXTREMES = [0, -1, 2**31 - 1, 2**63, float("nan"), float("inf")]
V = GGUFValueType


SPECS = {"llama": llama_spec, "gpt-oss": gpt_oss_spec, "deepseek2": deepseek2_spec}


def as_typed(value, vtype: GGUFValueType) -> tuple[object, GGUFValueType]:
    """`value` in the key's own type where it fits (-1 wraps in an unsigned one), else in a type that holds it."""
    if isinstance(value, float):
        return value, V.FLOAT32
    if vtype in (V.FLOAT32, V.FLOAT64):
        return float(value), vtype
    if vtype in (V.UINT32, V.INT32):
        if vtype == V.UINT32 and 0 <= value < 2**32 or vtype == V.INT32 and -(2**31) <= value < 2**31:
            return value, vtype
        return (value % 2**64, V.UINT64) if value >= 0 else (value, V.INT64)
    if vtype == V.STRING:
        return value % 2**64, V.UINT64  # a number where a string belongs
    return value % 2**32, V.UINT32  # an array replaced by a number


def load_case(path) -> None:
    """Load through the engine, as `hearth run` and `LLM(FILE)` do, then generate: no exception other than a one-line
    load error, within CASE_SECONDS."""
    from hearth.llm import LLM
    from hearth.sampling_params import SamplingParams

    _open_cached.cache_clear()

    def timeout(signum, frame):
        raise TimeoutError(f"{path.name}: the case ran past {CASE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(CASE_SECONDS)
    try:
        llm = LLM(str(path), dtype="float32", max_num_seqs=1)
        out = llm.generate([[2, 3, 4]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        # a file whose metadata still describes valid tensors but moves their bytes (an alignment that shifts the
        # data section) loads garbage; non-finite logits then fail that request alone (finish_reason "error")
        assert len(out[0].token_ids) == 2 or (out[0].finish_reason == "error" and not out[0].token_ids), out[0]
    except (ModelLoadError, ValueError) as e:
        assert "\n" not in str(e), repr(e)
        if not isinstance(e, ModelLoadError):  # the tokenizer's own refusals; everything else is the loader's
            assert "tokenizer" in str(e), repr(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        _open_cached.cache_clear()


@pytest.fixture(scope="module", params=list(SPECS))
def model_file(request, tmp_path_factory):
    arch, kvs, tensors = SPECS[request.param]()
    path = tmp_path_factory.mktemp("model") / f"{request.param}.gguf"
    data = write_model(path, arch, kvs, tensors)
    load_case(path)  # the unmutated file loads and generates
    return arch, kvs, tensors, data


def test_unmutated_models_load_with_defaults(model_file, tmp_path):
    from hearth.llm import LLM

    arch, kvs, tensors, data = model_file
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    llm = LLM(str(path), dtype="float32")
    context = {k: v for k, v, _ in kvs}[f"{arch}.context_length"]
    assert llm.engine.max_model_len == min(context, 8192)  # the file's 131072 is capped, not allocated
    assert llm.engine.runner.model.model.rotary_emb.cos.shape[0] == llm.engine.max_model_len


def test_every_metadata_key_at_extreme_values(model_file, tmp_path):
    arch, kvs, tensors, _ = model_file
    cases = 0
    for i, (key, _, vtype) in enumerate(kvs):
        for extreme in EXTREMES:
            value, new_type = as_typed(extreme, vtype)
            mutated = kvs[:i] + [(key, value, new_type)] + kvs[i + 1 :]
            path = tmp_path / f"{cases}.gguf"
            write_model(path, arch, mutated, tensors)
            load_case(path)
            path.unlink()
            cases += 1
    assert cases == len(kvs) * len(EXTREMES)


def header_layout(data: bytes) -> tuple[int, list[tuple[str, int]], int]:
    """(alignment value position or -1, [(tensor name, position of its offset field)], data start) of a file."""
    pos, align_pos = 24, -1
    num_tensors, num_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n : pos].decode()

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype in sizes:
            pos += sizes[vtype]
        elif vtype == 8:
            string()
        else:
            elem, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                value(elem)

    for _ in range(num_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if key == "general.alignment":
            align_pos = pos
        value(vtype)
    offsets = []
    for _ in range(num_tensors):
        name = string()
        (num_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * num_dims + 4
        offsets.append((name, pos))
        pos += 8
    return align_pos, offsets, -(-pos // 32) * 32


def test_misaligned_overlapping_and_out_of_range_offsets(model_file, tmp_path):
    _, _, _, data = model_file
    _, offsets, data_start = header_layout(data)
    path = tmp_path / "o.gguf"
    size = len(data)
    for i, (_, at) in enumerate(offsets):
        (offset,) = struct.unpack_from("<Q", data, at)
        other = struct.unpack_from("<Q", data, offsets[(i + 1) % len(offsets)][1])[0]
        for new, why in ((offset + 1, "not a multiple"), (offset + 16, "not a multiple"),
                         (other, "overlap|past the end"), (size - data_start + 32, "past the end|not a multiple"),
                         (2**63, "past the end"), (2**64 - 32, "past the end")):  # fmt: skip
            buf = bytearray(data)
            struct.pack_into("<Q", buf, at, new)
            path.write_bytes(bytes(buf))
            _open_cached.cache_clear()
            with pytest.raises(ModelLoadError, match=why):
                open_gguf(path)
            load_case(path)


def test_alignment_values(model_file, tmp_path):
    arch, kvs, tensors, _ = model_file
    path = tmp_path / "a.gguf"
    writer_kvs = kvs + [("general.alignment", 64, V.UINT32)]
    data = write_model(path, arch, writer_kvs, tensors)
    align_pos, _, _ = header_layout(data)
    for value in (0, 1, 3, 16, 32, 2**31 - 1, 2**32 - 1):
        buf = bytearray(data)
        struct.pack_into("<I", buf, align_pos, value)
        path.write_bytes(bytes(buf))
        load_case(path)


def test_truncated_models(model_file, tmp_path):
    _, _, _, data = model_file
    path = tmp_path / "t.gguf"
    for n in sorted({*range(0, len(data), max(1, len(data) // 60)), len(data) - 1}):
        path.write_bytes(data[:n])
        _open_cached.cache_clear()
        with pytest.raises(ModelLoadError):
            open_gguf(path)
        load_case(path)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(st.data())
def test_model_header_bit_flips(model_file, tmp_path, data):
    raw = model_file[3]
    _, offsets, _ = header_layout(raw)
    header_end = offsets[-1][1] + 8
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, header_end - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "b.gguf"
    path.write_bytes(bytes(buf))
    load_case(path)


CLI_SAMPLE = [("llama.block_count", 2**31 - 1), ("llama.attention.head_count", 0),
              ("llama.rope.freq_base", float("nan")), ("llama.attention.layer_norm_rms_epsilon", float("inf"))]  # fmt: skip


def test_cli_fails_in_one_line_with_bounded_memory(tmp_path):
    """Through `hearth run`: exit 1 and exactly one line on stderr for corrupt files (the misaligned and overlapping
    offsets too); a context_length of 2^31-1 loads and answers (the KV pool and rope tables are sized from the
    memory budget); the child's peak RSS stays within 2x the file plus 1 GiB."""
    import os
    import subprocess
    import sys

    arch, kvs, tensors = llama_spec()
    files = []
    for key, value in CLI_SAMPLE + [("llama.context_length", 2**31 - 1)]:
        mutated = [(k, *as_typed(value, t)) if k == key else (k, v, t) for k, v, t in kvs]
        files.append(tmp_path / f"{key}.gguf")
        write_model(files[-1], arch, mutated, tensors)
    data = write_model(tmp_path / "ok.gguf", arch, kvs, tensors)
    _, offsets, _ = header_layout(data)
    for name, new in (("misaligned", lambda off, other: off + 4), ("overlap", lambda off, other: other)):
        buf = bytearray(data)
        at = offsets[1][1]
        struct.pack_into("<Q", buf, at, new(struct.unpack_from("<Q", buf, at)[0],
                                            struct.unpack_from("<Q", buf, offsets[2][1])[0]))  # fmt: skip
        files.insert(0, tmp_path / f"{name}.gguf")
        files[0].write_bytes(bytes(buf))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo, "HEARTH_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, *map(str, files)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    for path, (rc, stderr) in zip(files, results, strict=True):
        if path is files[-1]:  # the huge context: it loads and answers
            assert rc == 0, stderr
            continue
        lines = stderr.strip().splitlines()
        assert rc == 1 and len(lines) == 1, (path.name, stderr)
        assert lines[0].startswith("hearth: error: ") and str(path) in lines[0], lines
    peak = report["peak_rss"]  # the child's own: RUSAGE_CHILDREN here would also count earlier tests' children
    assert peak <= 2 * max(p.stat().st_size for p in files) + (1 << 30), f"peak RSS {peak >> 20} MiB"


# `hearth run FILE hi` for each file in one process (torch imports once), with its exit status and stderr
CLI_SCRIPT = """
import contextlib, io, json, sys
from hearth.cli.main import main
results = []
for path in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", path, "hi", "--max-tokens", "1"])
    results.append((rc, err.getvalue()))
# VmHWM: this process's peak since exec (ru_maxrss would carry over the forking parent's peak)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print(json.dumps({"results": results, "peak_rss": peak}))
"""
