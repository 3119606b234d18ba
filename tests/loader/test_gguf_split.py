"""Split GGUF models (NAME-00001-of-0000N.gguf, llama.cpp's gguf-split layout, written here by gguf.GGUFWriter's own
splitting): opened from any part as one file whose metadata and tensors equal the unsplit file's, and run."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from gguf import GGUFValueType as V
from gguf_models import llama_spec, write_model  # tests/gguf_models.py

from hearth.loader import ModelLoadError
from hearth.loader.gguf import open_gguf
from hearth.quant.gguf_types import QuantizedTensor
from hearth.sampling_params import SamplingParams

PARTS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, list[str]]:
    folder = tmp_path_factory.mktemp("split")
    arch, kvs, tensors = llama_spec()
    write_model(folder / "whole.gguf", arch, kvs, tensors)
    per_part = -(-len(tensors) // PARTS)
    write_model(folder / "tiny.gguf", arch, kvs, tensors, split_max_tensors=per_part)
    parts = sorted(str(p) for p in folder.glob("tiny-*-of-*.gguf"))
    assert [os.path.basename(p) for p in parts] == [f"tiny-{i:05d}-of-{PARTS:05d}.gguf" for i in range(1, PARTS + 1)]
    return str(folder / "whole.gguf"), parts


def raw(t: torch.Tensor | QuantizedTensor) -> bytes:
    data = t.data if isinstance(t, QuantizedTensor) else t
    return data.contiguous().view(torch.uint8).numpy().tobytes()


def test_split_reads_as_the_whole_file(files):
    whole_path, parts = files
    whole = open_gguf(whole_path)
    for path in parts:  # any part opens the whole model
        split = open_gguf(path)
        assert split.paths == parts and split.path == parts[0]
        assert split.metadata == whole.metadata  # the model's keys, without split.*
        assert not any(k.startswith("split.") for k in split.metadata)
        assert [(t.name, t.shape, t.ggml_type) for t in split.tensor_infos] == \
            [(t.name, t.shape, t.ggml_type) for t in whole.tensor_infos]  # fmt: skip
        assert sorted({t.part for t in split.tensor_infos}) == list(range(PARTS))
        got = dict(split.iter_tensors())
        for name, tensor in whole.iter_tensors():
            assert raw(got[name]) == raw(tensor), name
    assert open_gguf(parts[0]).file_size == sum(os.path.getsize(p) for p in parts)


def test_split_model_generates_as_the_whole_one(files):
    from hearth.llm import LLM

    whole_path, parts = files
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = [LLM(path, max_model_len=64, dtype="float32").generate([[2, 3, 4, 5]], params)[0] for path in
               (whole_path, parts[0])]  # fmt: skip
    assert outputs[0].token_ids == outputs[1].token_ids and len(outputs[0].token_ids) == 6


def test_broken_splits_fail_in_one_line(files, tmp_path):
    _, parts = files
    copies = [shutil.copy(p, tmp_path) for p in parts]
    os.remove(copies[1])
    with pytest.raises(ModelLoadError, match=r"part 2 of 3 of this split model is missing"):
        open_gguf(copies[0])
    # parts swapped under each other's names: the metadata says which is which
    shutil.copy(parts[2], copies[1])
    shutil.copy(parts[1], copies[2])
    with pytest.raises(ModelLoadError, match=r"expected part 2 of 3 \(split.no 1\)"):
        open_gguf(copies[0])
    # a part renamed out of the NAME-0000i-of-0000N pattern cannot say where its siblings are
    lone = tmp_path / "renamed.gguf"
    shutil.copy(parts[0], lone)
    with pytest.raises(ModelLoadError, match="its name does not say which"):
        open_gguf(lone)


def write_by_hand(folder, total: int, first: list[str], second: list[str]) -> str:
    """Two parts written as plain GGUF files with the split keys added by hand; `total` is split.tensors.count."""
    arch, kvs, tensors = llama_spec()
    split = [("split.count", 2, V.UINT16)]
    write_model(folder / "hand-00001-of-00002.gguf", arch, kvs + split + [("split.no", 0, V.UINT16),
                ("split.tensors.count", total, V.INT32)], {k: tensors[k] for k in first})  # fmt: skip
    write_model(folder / "hand-00002-of-00002.gguf", arch, split + [("split.no", 1, V.UINT16)],
                {k: tensors[k] for k in second})  # fmt: skip
    return str(folder / "hand-00001-of-00002.gguf")


def test_split_by_hand_and_its_checks(files, tmp_path):
    whole = open_gguf(files[0])
    names = [t.name for t in whole.tensor_infos]
    half = len(names) // 2
    path = write_by_hand(tmp_path, len(names), names[:half], names[half:])
    split = open_gguf(path)
    assert [t.name for t in split.tensor_infos] == names and split.metadata == whole.metadata
    (tmp_path / "a").mkdir()
    path = write_by_hand(tmp_path / "a", len(names) + 1, names[:half], names[half:])
    with pytest.raises(ModelLoadError, match=rf"split.tensors.count says {len(names) + 1} tensors, but the 2 parts"):
        open_gguf(path)
    (tmp_path / "b").mkdir()
    path = write_by_hand(tmp_path / "b", len(names) + 1, names[: half + 1], names[half:])
    with pytest.raises(ModelLoadError, match=rf"tensor {names[half]!r} is in more than one part"):
        open_gguf(path)
