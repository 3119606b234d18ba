"""GGUF and safetensors loading: a tiny llama GGUF written with gguf.GGUFWriter, read back through hearth.loader."""

import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, RopeScalingType, quants
from gguf import GGUFValueType as V
from safetensors.torch import save_file

from hearth.loader import ModelLoadError
from hearth.loader.gguf import open_gguf
from hearth.loader.inspect import describe, read_gguf_config, read_hf_config
from hearth.loader.names import gguf_to_hf_name, is_permuted, permute_qk, unpermute_qk
from hearth.loader.safetensors import iter_safetensors
from hearth.quant.gguf_types import QuantizedTensor

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 256, 2, 256
HEAD_DIM = HIDDEN // HEADS
# GGUF type per weight name (per layer for blk tensors); the rest are F32
TYPES = {"token_embd": T.Q8_0, "output": T.F16, "attn_q": (T.Q4_1, T.F16), "attn_k": (T.F32, T.Q8_0),
         "attn_v": (T.BF16, T.Q5_0), "ffn_down": (T.Q4_0, T.Q6_K), "ffn_up": (T.MXFP4, T.Q5_1)}  # fmt: skip


def hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-layout float32 weights of a tiny llama, keyed by GGUF name."""
    shapes = {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN), "output_norm": (HIDDEN,)}
    block = {"attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN),
             "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
             "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
             "ffn_down": (HIDDEN, FFN)}  # fmt: skip
    shapes |= {f"blk.{i}.{k}": s for i in range(LAYERS) for k, s in block.items()}
    return {f"{k}.weight": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def encode(name: str, w: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, T]:
    """The bytes GGUFWriter stores for `name`: gguf-py quantization, or random finite blocks for Q6_K."""
    parts = name.split(".")
    key, layer = (parts[2], int(parts[1])) if parts[0] == "blk" else (parts[0], 0)
    qtype = TYPES.get(key, T.F32)
    qtype = qtype[layer] if isinstance(qtype, tuple) else qtype
    if qtype == T.F32:
        return w, qtype
    if qtype == T.F16:
        return w.astype(np.float16), qtype
    if qtype == T.Q6_K:
        raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // 256, 210), dtype=np.uint8)
        raw[..., 208:] = (rng.standard_normal(raw.shape[:2]) * 1e-3).astype(np.float16)[..., None].view(np.uint8)
        return raw.reshape(w.shape[0], -1), qtype
    return quants.quantize(w, qtype), qtype


def finish(writer: GGUFWriter, tensors: dict[str, tuple[np.ndarray, T]]) -> None:
    """Add the tensors (quantized ones as raw bytes of their type), write the file and close it."""
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, T]], tokens: list[str], alignment=0) -> None:
    writer = GGUFWriter(str(path), arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages }}")
    finish(writer, tensors)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(path, HF-layout weights, the encoded tensors as written) of a tiny llama GGUF with permuted q/k."""
    rng = np.random.default_rng(0)
    weights = hf_weights(rng)
    stored = {}
    for name, w in weights.items():
        if is_permuted("llama", name):
            n_head = HEADS if ".attn_q." in name else KV_HEADS
            w = permute_qk(torch.from_numpy(w), n_head).numpy()  # what llama.cpp's converter does
        stored[name] = encode(name, w, rng)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    tokens = [f"tok{i}" for i in range(VOCAB - 3)] + ["<s>", "</s>", "ünïcode ✓"]
    write_gguf(path, "llama", stored, tokens)
    return path, weights, stored


def hf_layout(name: str, t: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
    if is_permuted("llama", name):
        return unpermute_qk(t, HEADS if ".attn_q." in name else KV_HEADS)
    return t


def test_read_back_tensors(tiny_llama):
    path, weights, stored = tiny_llama
    g = open_gguf(path)
    assert g.architecture == "llama" and g.version == 3 and g.file_size == path.stat().st_size
    assert [t.name for t in g.tensor_infos] == list(stored)
    seen = {}
    for (name, t), info in zip(g.iter_tensors(), g.tensor_infos, strict=True):
        data, qtype = stored[name]
        assert info.ggml_type == qtype and info.shape == weights[name].shape and info.nbytes == data.nbytes
        if qtype in (T.F32, T.F16, T.BF16):
            assert isinstance(t, torch.Tensor) and t.shape == weights[name].shape
            assert t.dtype == {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
            stored_bytes = torch.from_numpy(data).flatten().view(torch.uint8)
            assert torch.equal(t.contiguous().flatten().view(torch.uint8), stored_bytes)
        else:
            assert isinstance(t, QuantizedTensor) and t.shape == weights[name].shape and t.qtype == qtype
            assert torch.equal(t.data, torch.from_numpy(data))
            assert torch.equal(t.dequantize(), torch.from_numpy(quants.dequantize(data, qtype)))
        seen[name] = t
    assert seen["output_norm.weight"].dim() == 1


def test_read_ahead_hints_joined_runs_of_the_views(tiny_llama):
    from hearth.loader.gguf import coalesce_ranges

    assert coalesce_ranges([(0, 9000, 9500), (1, 0, 10), (0, 100, 5000), (0, 5000, 8000), (0, 14000, 15000)], 4096) == [
        (0, 0, 9500), (0, 12288, 15000), (1, 0, 10)]  # fmt: skip  # within a page joined; starts page-aligned
    path, _, _ = tiny_llama
    g = open_gguf(path)
    views = [t.data if isinstance(t, QuantizedTensor) else t for _, t in g.iter_tensors()]
    assert g.read_ahead([]) is None
    before = [v.flatten()[:64].clone() for v in views]
    thread = g.read_ahead(g.mapped_ranges(views))  # runs off the caller's path; the maps outlive it
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert all(torch.equal(v.flatten()[:64], b) for v, b in zip(views, before))  # hints change no byte of the views


def test_unpermute_restores_hf_qk(tiny_llama):
    path, weights, _ = tiny_llama
    tensors = dict(open_gguf(path).iter_tensors())
    # float: layer 0 attn_k is F32, exact; layer 1 attn_q is F16, exact after the same f16 rounding
    assert torch.equal(hf_layout("blk.0.attn_k.weight", tensors["blk.0.attn_k.weight"]),
                       torch.from_numpy(weights["blk.0.attn_k.weight"]))  # fmt: skip
    q1 = hf_layout("blk.1.attn_q.weight", tensors["blk.1.attn_q.weight"])
    assert torch.equal(q1, torch.from_numpy(weights["blk.1.attn_q.weight"]).half())
    # quantized: unpermuting raw rows gives the bytes of quantizing the HF-layout weight directly
    for name, qtype in (("blk.0.attn_q.weight", T.Q4_1), ("blk.1.attn_k.weight", T.Q8_0)):
        qt = hf_layout(name, tensors[name])
        assert isinstance(qt, QuantizedTensor) and qt.shape == weights[name].shape
        assert torch.equal(qt.data, torch.from_numpy(quants.quantize(weights[name], qtype)))
    # other tensors are not permuted, and qwen2 is never permuted
    assert not is_permuted("llama", "blk.0.attn_v.weight") and not is_permuted("qwen2", "blk.0.attn_q.weight")


def test_permute_formula_and_bias():
    hd = 8
    bias = torch.arange(3 * hd, dtype=torch.float32)  # 1-D, 3 heads
    permuted = permute_qk(bias, 3)
    for h in range(3):
        for i in range(hd // 2):
            for j in range(2):  # new row 2i + j = old row j·hd/2 + i, within each head
                assert permuted[h * hd + 2 * i + j] == bias[h * hd + j * hd // 2 + i]
    assert torch.equal(unpermute_qk(permuted, 3), bias)
    with pytest.raises(ValueError, match="heads"):
        unpermute_qk(torch.zeros(10, 4), 3)


def test_names():
    assert gguf_to_hf_name("llama", "token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("llama", "output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("llama", "output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("llama", "blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("qwen2", "blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert gguf_to_hf_name("llama", "blk.1.attn_output.weight") == "model.layers.1.self_attn.o_proj.weight"
    assert gguf_to_hf_name("llama", "blk.1.attn_norm.weight") == "model.layers.1.input_layernorm.weight"
    assert gguf_to_hf_name("llama", "blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert gguf_to_hf_name("qwen2", "blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    for arch, name in (("llama", "rope_freqs.weight"), ("llama", "blk.0.ffn_gate_exps.weight"),
                       ("llama", "foo"), ("mamba", "token_embd.weight")):  # fmt: skip
        assert gguf_to_hf_name(arch, name) is None
    hf = {gguf_to_hf_name("llama", n) for n in hf_weights(np.random.default_rng(0))}
    assert len(hf) == 3 + 9 * LAYERS and None not in hf


def test_gguf_config_and_describe(tiny_llama):
    path, _, stored = tiny_llama
    g = open_gguf(path)
    assert g.metadata["tokenizer.ggml.tokens"][-3:] == ["<s>", "</s>", "ünïcode ✓"]
    assert g.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    cfg = read_gguf_config(g)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", HIDDEN, LAYERS)
    assert (cfg.intermediate_size, cfg.vocab_size) == (FFN, VOCAB)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 512
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.eos_token_ids == [2] and cfg.bos_token_id == 1 and not cfg.tie_word_embeddings
    info = describe(str(path))
    assert info["format"] == "gguf" and info["architecture"] == "llama" and info["has_chat_template"]
    assert info["num_parameters"] == sum(w.size for w in hf_weights(np.random.default_rng(0)).values())
    assert info["quantization"]["F32"] == sum(qtype == T.F32 for _, qtype in stored.values())
    assert info["quantization"]["Q4_1"] == 1 and info["file_size"] == path.stat().st_size


def test_qwen2_tied_config(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": (rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), T.F32),
               "blk.0.attn_q.bias": (rng.standard_normal(HIDDEN).astype(np.float32), T.F32)}  # fmt: skip
    write_gguf(tmp_path / "q.gguf", "qwen2", tensors, [f"t{i}" for i in range(VOCAB)], alignment=256)
    g = open_gguf(tmp_path / "q.gguf")
    assert g.metadata["general.alignment"] == 256 and g.tensor_infos[0].offset % 256 == 0
    assert all(torch.equal(t, torch.from_numpy(tensors[name][0])) for name, t in g.iter_tensors())
    cfg = read_gguf_config(g, check_tensors=False)  # the metadata alone: the file holds two tensors
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings and cfg.attention_bias
    write_gguf(tmp_path / "m.gguf", "mamba", tensors, ["a"])
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        read_gguf_config(str(tmp_path / "m.gguf"))


def open_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        open_gguf(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def patched(src, dst, offset: int, fmt: str, *values) -> str:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    dst.write_bytes(bytes(data))
    return dst


def test_open_errors(tiny_llama, tmp_path):
    path = tiny_llama[0]
    raw = path.read_bytes()
    assert "no such file" in open_error(tmp_path / "missing.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + raw[4:])
    assert "bad magic" in open_error(tmp_path / "magic.gguf")
    (tmp_path / "half.gguf").write_bytes(raw[: len(raw) // 2])
    assert "truncated" in open_error(tmp_path / "half.gguf")
    (tmp_path / "head.gguf").write_bytes(raw[:300])
    assert "truncated" in open_error(tmp_path / "head.gguf")
    (tmp_path / "tiny.gguf").write_bytes(raw[:10])
    assert "truncated" in open_error(tmp_path / "tiny.gguf")
    assert "version 7" in open_error(patched(path, tmp_path / "v7.gguf", 4, "<I", 7))
    # the last tensor info: name, n_dims, dims, type, offset
    last = open_gguf(path).tensor_infos[-1]
    at = raw.index(last.name.encode()) + len(last.name) + 4 + 8 * len(last.shape)
    assert "unknown GGML type id 99" in open_error(patched(path, tmp_path / "type.gguf", at, "<I", 99))
    message = open_error(patched(path, tmp_path / "offset.gguf", at + 4, "<Q", 1 << 40))
    assert repr(last.name) in message and "past the end" in message


def test_absurd_counts_fail_without_allocating(tiny_llama, tmp_path):
    path = tiny_llama[0]
    array_bomb = tmp_path / "array.gguf"  # one key: a u8 array claiming 2^60 elements
    array_bomb.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q1sIIQ", 1, b"a", 9, 0, 1 << 60))
    tracemalloc.start()
    try:
        assert "corrupt header" in open_error(patched(path, tmp_path / "nt.gguf", 8, "<Q", 1 << 62))
        assert "corrupt header" in open_error(patched(path, tmp_path / "nkv.gguf", 16, "<Q", 1 << 40))
        assert "array 'a'" in open_error(array_bomb)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()


def test_unsupported_tensor_type(tmp_path):
    raw = np.random.default_rng(2).integers(0, 256, size=(4, 84), dtype=np.uint8)
    write_gguf(tmp_path / "q2k.gguf", "llama", {"blk.0.ffn_down.weight": (raw, T.Q2_K)}, ["a"])
    message = open_error(tmp_path / "q2k.gguf")
    assert "'blk.0.ffn_down.weight'" in message and "Q2_K" in message
    g = open_gguf(tmp_path / "q2k.gguf", check_types=False)  # `hearth show` can still describe it
    assert g.tensor_infos[0].type_name == "Q2_K"
    with pytest.raises(ModelLoadError, match="Q2_K"):
        next(g.iter_tensors())


@pytest.fixture(scope="module")
def smollm2():
    from hearth.loader.resolve import embedded_model_path

    try:
        return open_gguf(embedded_model_path())
    except ModelLoadError as e:
        pytest.skip(str(e))


def test_embedded_smollm2_metadata(smollm2):
    cfg = read_gguf_config(smollm2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.intermediate_size == 1536 and cfg.eos_token_ids == [2]
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152
    assert {t.type_name for t in smollm2.tensor_infos} == {"Q4_1", "Q8_0", "F32"}
    assert smollm2.metadata["tokenizer.chat_template"].startswith("{%")
    name, embed = next(smollm2.iter_tensors())  # token_embd, Q8_0: check two rows against the oracle
    ref = quants.dequantize(embed.data[:2].numpy(), T.Q8_0)
    assert name == "token_embd.weight" and torch.equal(embed.dequantize()[:2], torch.from_numpy(ref))


def reader_metadata(reader: GGUFReader) -> dict:
    """gguf.GGUFReader's fields as Hearth converted them when it read files through the reader (the reference)."""
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own pseudo-keys
            continue
        if field.types == [V.ARRAY]:
            metadata[key] = []  # empty array: the reader records no element type
        else:
            value = field.contents()
            metadata[key] = float(str(np.float32(value))) if field.types == [V.FLOAT32] else value
    return metadata


def typed(value):
    """A value with its Python types spelled out, so that True != 1 and 1.0 != 1 when compared."""
    return [typed(v) for v in value] if isinstance(value, list) else (type(value).__name__, value)


def assert_matches_reader(path) -> None:
    """open_gguf's metadata (values and types, in file order) and every tensor's bytes equal gguf.GGUFReader's."""
    reader = GGUFReader(str(path))
    expected = reader_metadata(reader)
    g = open_gguf(path, check_types=False)
    assert list(g.metadata) == list(expected)
    for key, value in expected.items():
        assert typed(g.metadata[key]) == typed(value), key
    assert len(g.tensor_infos) == len(reader.tensors)
    for (name, t), info, ref in zip(g.iter_tensors(), g.tensor_infos, reader.tensors, strict=True):
        assert name == info.name == ref.name and info.ggml_type == ref.tensor_type
        assert info.offset == ref.data_offset and info.nbytes == ref.n_bytes == ref.data.nbytes
        assert info.shape == tuple(reversed(ref.shape.tolist())) == tuple(t.shape)
        data = t if isinstance(t, torch.Tensor) else t.data
        assert data.is_contiguous() and data.untyped_storage().nbytes() == info.nbytes  # a view of just this tensor
        assert np.array_equal(data.reshape(-1).view(torch.uint8).numpy(), ref.data.reshape(-1).view(np.uint8))


class EmptyArrayWriter(GGUFWriter):
    """GGUFWriter refuses empty arrays, which llama.cpp writes (an element type and count 0): pack those by hand."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == V.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type or V.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


EVERY_VALUE_TYPE = [  # (key, value, value type, array element type)
    ("u8", 255, V.UINT8, None), ("i8", -128, V.INT8, None), ("u16", 65535, V.UINT16, None),
    ("i16", -32768, V.INT16, None), ("u32", 2**32 - 1, V.UINT32, None), ("i32", -(2**31), V.INT32, None),
    ("u64", 2**64 - 1, V.UINT64, None), ("i64", -(2**63), V.INT64, None), ("f32", 1e-5, V.FLOAT32, None),
    ("f32_inf", float("-inf"), V.FLOAT32, None), ("f64", 0.1, V.FLOAT64, None), ("yes", True, V.BOOL, None),
    ("no", False, V.BOOL, None), ("str", "ünïcode ✓ <|im_start|>", V.STRING, None), ("empty_str", "", V.STRING, None),
    ("a_u8", [0, 7, 255], V.ARRAY, V.UINT8), ("a_i8", [-128, 0, 127], V.ARRAY, V.INT8),
    ("a_u16", [0, 65535], V.ARRAY, V.UINT16), ("a_i16", [-32768, 1], V.ARRAY, V.INT16),
    ("a_u32", [1, 2**32 - 1], V.ARRAY, V.UINT32), ("a_i32", [1, 3, 6, -(2**31)], V.ARRAY, V.INT32),
    ("a_u64", [2**64 - 1, 0], V.ARRAY, V.UINT64), ("a_i64", [-(2**63), 5], V.ARRAY, V.INT64),
    ("a_f32", [0.1, -2.5, float("inf"), 1e-5], V.ARRAY, V.FLOAT32), ("a_f64", [0.1, -1e300], V.ARRAY, V.FLOAT64),
    ("a_bool", [True, False, True], V.ARRAY, V.BOOL), ("a_str", ["a", "", "ü ✓", "Ġthe Ġcat"], V.ARRAY, V.STRING),
    ("a_empty_i32", [], V.ARRAY, V.INT32), ("a_empty_str", [], V.ARRAY, V.STRING),
    ("a_empty_f32", [], V.ARRAY, V.FLOAT32), ("a_nested", [[1, 2], [3], []], V.ARRAY, None),
    ("a_nested_str", [["x", "yz"], ["ü"]], V.ARRAY, None), ("a_nested_empty_first", [[], [4, 5]], V.ARRAY, None),
]  # fmt: skip


def test_every_value_type_matches_gguf_reader(tmp_path):
    path = tmp_path / "all-types.gguf"
    writer = EmptyArrayWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    for key, value, vtype, sub_type in EVERY_VALUE_TYPE:
        writer.add_key_value(f"test.{key}", value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 4, 64)).astype(np.float32)
    tensors = {"f32.weight": (w[0], T.F32), "f16.weight": (w[0, 0].astype(np.float16), T.F16),
               "bf16.weight": (quants.quantize(w[1], T.BF16), T.BF16), "q8.weight": (quants.quantize(w[0], T.Q8_0), T.Q8_0),
               "experts.weight": (quants.quantize(w, T.Q4_0), T.Q4_0)}  # fmt: skip
    finish(writer, tensors)
    assert_matches_reader(path)
    g = open_gguf(path)
    for key, value, vtype, sub_type in EVERY_VALUE_TYPE:  # and the values are the ones written
        if vtype == V.ARRAY:
            want = [x for v in value for x in v] if sub_type is None else value  # arrays of arrays come back flat
            want = [float(np.float32(x)) for x in want] if sub_type == V.FLOAT32 else want
        else:
            want = float(str(np.float32(value))) if vtype == V.FLOAT32 else value
        assert typed(g.metadata[f"test.{key}"]) == typed(want), key
    assert g.metadata["general.alignment"] == 64 and all(info.offset % 64 == 0 for info in g.tensor_infos)
    got = dict(g.iter_tensors())
    assert got["experts.weight"].shape == (2, 4, 64) and got["experts.weight"].data.shape == (8, 36)
    assert got["bf16.weight"].dtype == torch.bfloat16 and torch.equal(got["f32.weight"], torch.from_numpy(w[0]))


def test_embedded_smollm2_matches_gguf_reader(smollm2):
    assert_matches_reader(smollm2.path)


def write_hf(folder, shards: int) -> dict[str, torch.Tensor]:
    folder.mkdir()
    config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 1,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": FFN}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {f"w{i}": torch.full((2, 3), float(i)) for i in range(4)}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return tensors
    weight_map = {}
    for s in range(shards):
        part = {k: v for i, (k, v) in enumerate(tensors.items()) if i % shards == s}
        save_file(part, str(folder / f"model-{s}.safetensors"))
        weight_map |= {k: f"model-{s}.safetensors" for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_safetensors_and_hf_config(tmp_path):
    for shards in (1, 2):
        folder = tmp_path / f"hf{shards}"
        tensors = write_hf(folder, shards)
        got = dict(iter_safetensors(str(folder)))
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    cfg = read_hf_config(str(tmp_path / "hf2"))
    assert cfg.model_type == "llama" and cfg.head_dim == HEAD_DIM
    info = describe(str(tmp_path / "hf1"))
    assert info["format"] == "safetensors" and info["num_parameters"] == 24 and not info["has_chat_template"]
    (tmp_path / "hf2" / "model-1.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing 1 of 2 shards"):
        list(iter_safetensors(str(tmp_path / "hf2")))
    (tmp_path / "hf1" / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{not json")
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        list(iter_safetensors(str(tmp_path / "hf1")))
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match="pickle checkpoints are refused because loading them runs code"):
        list(iter_safetensors(str(pickle)))
    with pytest.raises(ModelLoadError, match="no config.json"):
        read_hf_config(str(pickle))
    (pickle / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="invalid config.json"):
        read_hf_config(str(pickle))
