"""The repack cache (loader/repack_cache.py) on a tiny gpt-oss GGUF with MXFP4 experts in llama.cpp's layout: written
at the first bf16 load, mapped at the next, ignored and rewritten when stale or damaged, written under $HEARTH_HOME
when the model's folder refuses it, and loads give the same weights and logits with and without it."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import prefill_logits
from gguf_models import write_mxfp4_gpt_oss  # tests/gguf_models.py

from hearth.kernels import mxfp4_cpu
from hearth.loader import repack_cache

pytestmark = pytest.mark.skipif(not mxfp4_cpu.available(), reason="no C compiler: bf16 MXFP4 experts are not repacked")


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEARTH_REPACK_CACHE", "1")
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "tiny-gpt-oss-mxfp4.gguf"
    write_mxfp4_gpt_oss(path)
    return str(path)


def load(path: str):
    """The model as a bf16 engine loads it, and its experts."""
    from hearth import LLM

    model = LLM(path, dtype="bfloat16", max_model_len=64, max_num_seqs=1).engine.runner.model
    return model, [layer.mlp.experts for layer in model.model.layers]


def logits(model) -> torch.Tensor:
    return prefill_logits(model, torch.arange(3, 40) % 60)


def test_written_once_then_mapped_with_identical_outputs(model_file, monkeypatch, caplog, capsys):
    monkeypatch.delenv("HEARTH_REPACK_CACHE")  # off by default
    plain, experts = load(model_file)
    assert not os.path.exists(model_file + repack_cache.SUFFIX) and not any(e.from_cache for e in experts)
    reference = logits(plain)
    monkeypatch.setenv("HEARTH_REPACK_CACHE", "1")

    with caplog.at_level(logging.INFO, logger="hearth.loader"):
        first, first_experts = load(model_file)
    cache = model_file + repack_cache.SUFFIX
    assert os.path.isfile(cache) and "repack cache written to" in caplog.text
    assert not any(e.from_cache for e in first_experts)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hearth.loader"):
        second, second_experts = load(model_file)
    assert all(e.from_cache for e in second_experts) and "mapped from the repack cache" in caplog.text
    for a, b, c in zip(experts, first_experts, second_experts):
        for name in ("gate_up.qs", "gate_up.sc", "down.qs", "down.sc"):
            assert torch.equal(a.repacked_state()[name], c.repacked_state()[name])
            assert torch.equal(b.repacked_state()[name], c.repacked_state()[name])
    assert torch.equal(logits(first), reference) and torch.equal(logits(second), reference)
    monkeypatch.delenv("HEARTH_REPACK_CACHE")  # (the cli sets up logging: after the caplog checks)
    assert "off (HEARTH_REPACK_CACHE=1" in show(model_file, capsys)


def show(path: str, capsys) -> str:
    from hearth.cli.main import main

    assert main(["show", path]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if "repack cache" in line)


def test_stale_cache_is_rebuilt(model_file, capsys):
    assert "none yet" in show(model_file, capsys)
    load(model_file)
    cache = model_file + repack_cache.SUFFIX
    assert f"{cache} (" in show(model_file, capsys) and "used by the next bf16 load" in show(model_file, capsys)
    before = os.stat(cache).st_mtime_ns
    st = os.stat(model_file)
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model changed since
    assert "stale or damaged" in show(model_file, capsys)
    _, experts = load(model_file)
    assert not any(e.from_cache for e in experts) and os.stat(cache).st_mtime_ns != before  # repacked and rewritten
    _, experts = load(model_file)  # the rewritten cache matches the model again
    assert all(e.from_cache for e in experts)


@pytest.mark.parametrize("damage", ["truncate", "magic", "header", "grow"])
def test_damaged_cache_is_ignored_and_rewritten(model_file, damage):
    _, fresh = load(model_file)
    reference = [e.repacked_state()["down.qs"].clone() for e in fresh]
    cache = model_file + repack_cache.SUFFIX
    size = os.path.getsize(cache)
    with open(cache, "r+b") as f:
        if damage == "truncate":
            f.truncate(size - 100)
        elif damage == "magic":
            f.write(b"NOTACACH")
        elif damage == "header":
            f.seek(20)
            f.write(b"\xff\x00{garbage")
        else:
            f.seek(size)
            f.write(b"\0" * 4096)
    _, experts = load(model_file)
    assert not any(e.from_cache for e in experts)
    assert all(torch.equal(e.repacked_state()["down.qs"], r) for e, r in zip(experts, reference))
    assert os.path.getsize(cache) == size  # rewritten whole
    _, experts = load(model_file)
    assert all(e.from_cache for e in experts)


def test_read_only_folder_uses_hearth_home(model_file, monkeypatch):
    folder = os.path.dirname(model_file)
    create = repack_cache._create_temp

    def refuse(where: str) -> str:  # as a folder the user cannot write (tests may run as root, where chmod does not bite)
        if os.path.samefile(where, folder):
            raise PermissionError(13, "Permission denied", where)
        return create(where)

    monkeypatch.setattr(repack_cache, "_create_temp", refuse)
    load(model_file)
    assert not os.path.exists(model_file + repack_cache.SUFFIX)
    home = os.path.join(os.environ["HEARTH_HOME"], "cache", "repack")
    files = os.listdir(home)
    assert len(files) == 1 and files[0].endswith(repack_cache.SUFFIX) and not files[0].startswith(".")
    assert repack_cache.find_cache(model_file) == os.path.join(home, files[0])
    _, experts = load(model_file)
    assert all(e.from_cache for e in experts)


def test_cache_file_round_trip_and_key(tmp_path, monkeypatch):
    """write_cache / open_cache on their own: views of the file with the same values; another key finds nothing."""
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEARTH_REPACK_CACHE", "1")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    key = repack_cache.cache_key([str(model)], b"header", torch.bfloat16)
    tensors = {"a.qs": torch.arange(5000, dtype=torch.int32).to(torch.uint8), "b": torch.randn(3, 7),
               "c": torch.zeros(0, dtype=torch.uint8)}  # fmt: skip
    assert repack_cache.write_cache(str(model), key, tensors) == str(model) + repack_cache.SUFFIX
    cache = repack_cache.open_cache(str(model), key)
    assert set(cache.tensors) == set(tensors)
    assert all(torch.equal(cache.tensors[k], v) for k, v in tensors.items())
    assert repack_cache.open_cache(str(model), {**key, "layout_version": key["layout_version"] + 1}) is None
    assert repack_cache.open_cache(str(model), repack_cache.cache_key([str(model)], b"other", torch.bfloat16)) is None
    ranks = [repack_cache.cache_key([str(model)], b"header", torch.bfloat16, f".rank{r}-of-2") for r in (0, 1)]
    assert ranks[0] != ranks[1] and key not in ranks  # a tensor-parallel rank's experts: a key and a file of its own
    assert repack_cache.candidate_paths(str(model), ".rank1-of-2")[0] == str(model) + ".rank1-of-2" + repack_cache.SUFFIX
    assert repack_cache.open_cache(str(model), ranks[1]) is None
