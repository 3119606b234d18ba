"""Tokenizer built from GGUF metadata against transformers' tokenizer from the same file (embedded SmolLM2)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import struct
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hearth.loader.resolve import embedded_model_path
from hearth.tokenizer import (
    _DEEPSEEK_LLM_LETTERS,
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


# ---- pre-tokenizers against references ------------------------------------------------------------------------------

# Fragments that exercise each rule: case runs, contractions in both cases, digit runs, CJK and kana, Hangul, emoji
# (with joiners and modifiers), combining marks, whitespace runs, CR/LF, slashes, punctuation glued to words.
FRAGMENTS = ["Hello", "WORLD", "hELLO", "'s", "'S", "'ll", "'LL", "'Re", "'ve", "'m", "'d", "n't", " ", "  ", "   ", "\t",
             "\n", "\n\n", "\r\n", " \n ", "1", "12", "1234567", "3.14", "1,000", "你好", "世界。", "ひらがな", "カタカナ",
             "한국어", "😀", "👨‍👩‍👧", "👍🏽", "🇫🇷", "e\u0301", "ﬁ", "Ünïcödé", "ŝtŕ", "/", "//", "a/b", ".,!?", "(x)",
             "<tag>", "\u00a0", "\u200b", "ǅ", "ᾈ", "Ⅻ", "½", "٣"]  # fmt: skip
texts = st.one_of(
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=14).map("".join),
    st.text(max_size=40),
)
# For encoders outside the HF `tokenizers` family (tiktoken, quicktok): their regex engines carry other Unicode
# versions, so a code point assigned after this Python's tables (U+323B0, Unicode 17) is a letter to one engine and
# not to the other. Such code points are dropped; every assigned one is kept.
assigned_texts = texts.map(lambda t: "".join(c for c in t if unicodedata.category(c) != "Cn"))


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_GPT2 = {**_BYTE_LEVEL, "use_regex": True}
_STARCODER = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2]}
_LLAMA3 = {"type": "Sequence", "pretokenizers": [_split(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
), _BYTE_LEVEL]}  # fmt: skip
_QWEN2 = {"type": "Sequence", "pretokenizers": [_split(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
), {**_BYTE_LEVEL, "trim_offsets": False}]}  # fmt: skip
_DEEPSEEK_V3 = {"type": "Sequence", "pretokenizers": [
    _split(r"\p{N}{1,3}"),
    _split("[一-龥぀-ゟ゠-ヿ]+"),
    _split("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
           "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
    _BYTE_LEVEL]}  # fmt: skip
_DEEPSEEK_LLM = {"type": "Sequence", "pretokenizers": [
    _split("[\r\n]"),
    _split("\\s?[" + _DEEPSEEK_LLM_LETTERS + "]+"),  # the letter class as the repository lists it
    _split("\\s?[!-/:-~！-／：-～‘-‟　-。]+"),
    _split("\\s+$"),
    _split("[一-龥ࠀ-一가-퟿]+"),
    {"type": "Digits", "individual_digits": False},
    _BYTE_LEVEL]}  # fmt: skip
_O200K = {"type": "Sequence", "pretokenizers": [_split(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
), _BYTE_LEVEL]}  # fmt: skip
# The pre_tokenizer of the tokenizer.json each GGUF pre-type is converted from (SmolLM2 and StarCoder: digits one by
# one, then GPT-2's regex; Llama 3 / DBRX / Smaug: Meta's regex; Qwen2 and R1-Distill-Qwen; DeepSeek V3/R1; DeepSeek
# LLM; GPT-4o / gpt-oss: o200k), written as the model repositories write them.
HF_PRE_TOKENIZERS = {
    "gpt2": _GPT2, "gpt-2": _GPT2, "default": _GPT2, "smollm": _STARCODER, "starcoder": _STARCODER,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "dbrx": _LLAMA3, "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "deepseek-v3": _DEEPSEEK_V3, "deepseek-llm": _DEEPSEEK_LLM,
    "gpt-4o": _O200K,
}  # fmt: skip


def _hf_pre_tokenizer(definition: dict):
    from tokenizers import Tokenizer as Backend

    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": definition, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "vocab": {}, "merges": []}}  # fmt: skip
    return Backend.from_str(json.dumps(spec)).pre_tokenizer


def test_every_pre_tokenizer_has_a_reference() -> None:
    assert set(HF_PRE_TOKENIZERS) == set(PRE_TOKENIZER_SPLITS)
    for pre in ("gpt-4o", "deepseek-v3", "deepseek-r1-qwen", "qwen2", "llama-bpe", "smollm"):  # the seed families
        assert pre in PRE_TOKENIZER_SPLITS


@pytest.mark.parametrize("pre", sorted(HF_PRE_TOKENIZERS))
def test_pre_tokenizer_splits_match_the_model_repositories(metadata: dict, pre: str) -> None:
    """Our Split + ByteLevel chain against `tokenizers`' own reading of the model repository's definition."""
    ours = _with_pre(metadata, pre).backend.pre_tokenizer
    theirs = _hf_pre_tokenizer(HF_PRE_TOKENIZERS[pre])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=texts)
    def check(text: str) -> None:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text)

    check()
    for text in TEXTS:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


# ---- gpt-oss (`gpt-4o`): the o200k vocabulary against tiktoken's encoder ---------------------------------------------


def _quicktok_ranks(name: str) -> dict[bytes, int]:
    """A tiktoken-style vocabulary (token bytes → id) from quicktok-v1's copies: o200k, llama3, qwen3."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None:
        pytest.skip("quicktok-v1 is not installed")
    with open(os.path.join(os.path.dirname(spec.origin), "data", f"{name}.vocab"), "rb") as f:
        data = f.read()
    (count,) = struct.unpack_from("<I", data, 0)
    pos, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2 : pos + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, pos + 2 + length)
        pos += 6 + length
    return ranks


def _gguf_vocab(ranks: dict[bytes, int], pre: str, specials: dict[str, int]) -> dict:
    """The `tokenizer.ggml.*` metadata llama.cpp's converter writes for a byte-level BPE vocabulary: tokens spelled
    byte-level, merges as HF's tiktoken conversion derives them (every split of a token into two tokens, ranked by
    the token), special tokens as control tokens at their ids (gaps are unused padding)."""
    from hearth.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, _bytes_to_unicode

    spell = _bytes_to_unicode()
    text = {tok: "".join(spell[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in ranks.items():
        splits = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(rank, a, b, f"{text[tok[:i]]} {text[tok[i:]]}") for a, b, i in splits]
    merges.sort()
    size = max([*ranks.values(), *specials.values()]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [TOKEN_UNUSED] * size
    for tok, rank in ranks.items():
        tokens[rank], types[rank] = text[tok], TOKEN_NORMAL
    for s, i in specials.items():
        tokens[i], types[i] = s, TOKEN_CONTROL
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [m[-1] for m in merges]}  # fmt: skip


def _load_from_metadata(meta: dict) -> Tokenizer:
    """Built the way a .gguf file is loaded, from its tokenizer metadata."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hearth.tokenizer._read_gguf_tokenizer_metadata", lambda path: meta)
        return load_tokenizer("model.gguf")


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory):
    """openai-harmony's encoding (tiktoken's o200k_base with the harmony special tokens), offline."""
    openai_harmony = pytest.importorskip("openai_harmony")
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in _quicktok_ranks("o200k").items()]
    folder = tmp_path_factory.mktemp("tiktoken")
    (folder / "o200k_base.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def gpt_oss_tok(harmony_encoding) -> Tokenizer:
    """gpt-oss's vocabulary as its GGUF carries it: o200k and the harmony special tokens, pre-tokenizer gpt-4o."""
    specials = {s: harmony_encoding.encode(s, allowed_special="all")[0] for s in harmony_encoding.special_tokens_set}
    return _load_from_metadata(_gguf_vocab(_quicktok_ranks("o200k"), "gpt-4o", specials))


def test_gpt_oss_vocab_matches_tiktoken(gpt_oss_tok: Tokenizer, harmony_encoding) -> None:
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=assigned_texts)
    @example(text="x<|constrain|>json <|start|>")
    def check(text: str) -> None:
        ids = gpt_oss_tok.encode(text)
        # special-token text becomes its id, as the GGUF tokenizer parses it (a chat template's "<|start|>")
        assert ids == harmony_encoding.encode(text, allowed_special="all")
        assert gpt_oss_tok.decode(ids, skip_special_tokens=False) == text

    check()
    for text in TEXTS:
        if "<|" not in text:
            assert gpt_oss_tok.encode(text) == harmony_encoding.encode(text), text


def test_gpt_oss_special_tokens_match_harmony(gpt_oss_tok: Tokenizer, harmony_encoding) -> None:
    text = ("<|start|>system<|message|>You are ChatGPT.<|end|><|start|>user<|message|>What's 2+2? Say it's 4.<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
            "<|message|>It's 4.<|return|>")  # fmt: skip
    ids = gpt_oss_tok.encode(text)
    assert ids == harmony_encoding.encode(text, allowed_special="all")
    assert gpt_oss_tok.token_to_id("<|channel|>") == 200005 and 200005 in gpt_oss_tok.all_special_ids
    assert gpt_oss_tok.decode(ids, skip_special_tokens=False) == text


# ---- an unusable vocabulary fails first ---------------------------------------------------------------------------


def _write_llama_gguf(path, pre: str) -> None:
    """A whole one-layer Llama of zeros (the loader checks the metadata against the tensor table before the tokenizer)
    with a 4-token byte-level vocabulary and pre-tokenizer `pre`."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2)]:  # fmt: skip
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab", "<|end|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(3)
    shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8), "blk.0.attn_v.weight": (8, 8),
              "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_pre_tokenizer_fails_before_the_weights(tmp_path, capsys, monkeypatch) -> None:
    from hearth import LLM
    from hearth.cli.main import main

    path = tmp_path / "martian.gguf"
    _write_llama_gguf(path, "martian")
    touched = []
    monkeypatch.setattr("hearth.loader.load.iter_checkpoint", lambda *a, **k: touched.append(a) or iter(()))
    with pytest.raises(ValueError, match=r"unknown GGUF pre-tokenizer 'martian'") as info:
        LLM(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    for argv in (["show", str(path), "--load"], ["serve", str(path), "--port", "0"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("hearth: error:") and "'martian'" in err, err
    assert not touched  # no weight was read
    # the same file with a known pre-tokenizer gets past the tokenizer
    _write_llama_gguf(path, "gpt-4o")
    assert load_tokenizer(str(path)).encode("abab") == [2, 2]


# ---- R1-Distill-Llama / Llama 3 and R1-Distill-Qwen / Qwen2.5 vocabularies against quicktok's exact encoders -------


@pytest.mark.parametrize(("vocab", "pre"), [("llama3", "llama-bpe"), ("qwen3", "deepseek-r1-qwen")])
def test_llama3_and_qwen_vocabs_match_their_reference_encoders(vocab: str, pre: str) -> None:
    """Llama 3's vocabulary with `llama-bpe` (whole words found in the vocabulary win over merges) and Qwen's with
    `deepseek-r1-qwen` (digits one by one), against quicktok's encoders, which match the HF tokenizers id for id.
    Qwen's HF tokenizer also NFC-normalizes its input and a GGUF vocabulary does not (neither does llama.cpp), so
    Qwen's texts are compared in NFC."""
    quicktok = pytest.importorskip("quicktok")
    tok = _load_from_metadata(_gguf_vocab(_quicktok_ranks(vocab), pre, {}))
    reference = quicktok.get_encoding(vocab)
    normalize = (lambda t: unicodedata.normalize("NFC", t)) if vocab == "qwen3" else (lambda t: t)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=assigned_texts.map(normalize))
    def check(text: str) -> None:
        assert tok.encode(text) == reference.encode_ordinary(text)

    check()
    for text in TEXTS:
        text = normalize(text)
        assert tok.encode(text) == reference.encode_ordinary(text), text


def test_gguf_vocab_stored_as_raw_text_is_respelled_and_a_repeated_token_keeps_its_first_id() -> None:
    """Some converters store a byte-level vocabulary's tokens as their text ("€", not its bytes spelled): those are
    spelled in the byte alphabet, the spelled ones and control tokens are kept as written; a token repeated later
    (padding) keeps the first id, as llama.cpp reads it."""
    from hearth.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, _bytes_to_unicode

    spell = _bytes_to_unicode()
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\xe2\x82"], ranks["€".encode()] = 256, 257
    meta = _gguf_vocab(ranks, "default", {"<|end|>": 258})
    tokens = list(meta["tokenizer.ggml.tokens"])
    assert tokens[257] == "".join(spell[b] for b in "€".encode())
    tokens[257] = "€"  # this one as raw text, the others spelled
    meta["tokenizer.ggml.tokens"] = [*tokens, spell[ord("a")]]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], TOKEN_NORMAL]
    assert meta["tokenizer.ggml.token_type"][258] == TOKEN_CONTROL
    tok = _load_from_metadata(meta)
    assert tok.encode("€") == [257] and tok.decode([257]) == "€"
    assert tok.encode("a<|end|>") == [ord("a"), 258]  # not the repeat of "a" at the end
