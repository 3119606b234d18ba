"""Tokenizer built from GGUF metadata against transformers' tokenizer from the same file (embedded SmolLM2)."""

from __future__ import annotations

import json
import os

import pytest

from hearth.loader.resolve import embedded_model_path
from hearth.tokenizer import (
    PRE_TOKENIZER_SPLITS,
    Tokenizer,
    _byte_level_bpe,
    _read_gguf_tokenizer_metadata,
    load_tokenizer,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, didn't we? WE'LL SEE.",
    "你好，世界！今天天气很好。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장입니다.",
    "emoji 😀🎉 and family 👨‍👩‍👧‍👦 and flag 🇫🇷 and skin tone 👍🏽",
    "def f(x):\n\treturn x + 1\n\n\tif x:\n\t\tpass\n",
    "    indented four\n        eight spaces\n",
    "class A:\n    def __init__(self):\n        self.x = {'a': [1, 2, 3]}\n",
    "many     spaces   between\twords",
    "trailing spaces    ",
    "\n\n\nnewlines\r\nand CRLF\n",
    "12345 67890 3.14159 1,000,000 2024-06-01",
    "x1y22z333 v0.19.0 0xFF",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>name<file_sep>",
    "café naïve résumé Ångström façade",
    "Zürich, Kraków, São Paulo, Đà Nẵng",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир! Ελληνικά",
    "mixed English和中文 with 123 numbers",
    "URL https://example.com/path?q=1&b=2#frag",
    "$\\frac{a}{b}$ and `code` and **bold**",
    "   ",
    "",
    "a",
    "!!!???...,,,",
    "tab\tseparated\tvalues\n1\t2\t3",
    "Ünïcödé ŝtŕíñĝ with combining e\u0301 and ﬁ ligature",
    "zero\u200bwidth and nbsp\u00a0here",
    "<|im_start|> spaced <|im_end|> special",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path: str, tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2")
    os.symlink(gguf_path, folder / "model.gguf")
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="model.gguf")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.bos_token) == (1, "<|im_start|>")
    assert (tok.eos_token_ids, tok.eos_token) == ([2], "<|im_end|>")
    assert tok.vocab_size == 49152
    assert tok.token_to_id("<|im_end|>") == 2 and tok.id_to_token(0) == "<|endoftext|>"
    assert set(range(17)) == set(tok.all_special_ids)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.encode("hi")[0] != tok.bos_token_id  # add_bos_token is false in this file
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_digits_split_one_by_one(tok: Tokenizer) -> None:
    pieces = [tok.id_to_token(i) for i in tok.encode(" 2024")]
    assert pieces == ["Ġ", "2", "0", "2", "4"]


def test_add_bos_when_model_asks(tok: Tokenizer) -> None:
    with_bos = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos=True)
    assert with_bos.encode("hi") == [1, *tok.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == tok.encode("hi")


def test_hf_folder(tok: Tokenizer, tmp_path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
              "chat_template": "ignored, chat_template.jinja wins"}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.bos_token_id == 1 and loaded.eos_token_ids == [2, 0] and not loaded.add_bos
    assert loaded.chat_template == "{{ messages[0]['content'] }}"
    for text in TEXTS[:10]:
        assert loaded.encode(text) == tok.encode(text)


@pytest.fixture(scope="module")
def metadata(gguf_path: str) -> dict:
    return _read_gguf_tokenizer_metadata(gguf_path)


def _with_pre(metadata: dict, pre: str) -> Tokenizer:
    meta = {**metadata, "tokenizer.ggml.pre": pre}
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    return Tokenizer(_byte_level_bpe(tokens, types, meta))


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_SPLITS))
def test_every_pre_tokenizer_builds_and_round_trips(metadata: dict, pre: str) -> None:
    tok = _with_pre(metadata, pre)
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_pre_tokenizer_digit_rules(metadata: dict) -> None:
    pieces = {pre: [t for t in _with_pre(metadata, pre).backend.pre_tokenizer.pre_tokenize_str("x 12345")]
              for pre in ("gpt2", "smollm", "llama-bpe", "qwen2", "deepseek-v3")}  # fmt: skip
    words = {pre: [w for w, _ in p] for pre, p in pieces.items()}
    assert words["gpt2"] == ["x", "Ġ12345"]
    assert words["smollm"] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert words["llama-bpe"] == ["x", "Ġ", "123", "45"]
    assert words["qwen2"] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert words["deepseek-v3"] == ["x", "Ġ", "123", "45"]


def test_unknown_pre_tokenizer(metadata: dict) -> None:
    with pytest.raises(ValueError, match="martian"):
        _with_pre(metadata, "martian")


def test_sentencepiece_vocab_matches_sentencepiece(tmp_path) -> None:
    """A `llama` (SentencePiece BPE, byte fallback) GGUF vocab: train a tiny model and compare ids with it."""
    gguf = pytest.importorskip("gguf")
    spm = pytest.importorskip("sentencepiece")
    import io

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!", "Numbers 123 and 4567.",
              "Le café est très bon.", "def f(x):\n    return x"] * 50  # fmt: skip
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(len(pieces))]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tok = load_tokenizer(str(tmp_path / "spm.gguf"))
    assert tok.add_bos and tok.encode("hi")[0] == sp.bos_id()
    for text in TEXTS:
        if "<|" in text:
            continue  # not special tokens in this vocabulary
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
