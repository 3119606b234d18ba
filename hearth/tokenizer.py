"""Tokenizers built from a GGUF vocabulary (`tokenizer.ggml.*`) or an HF folder (`tokenizer.json`).

`Tokenizer` wraps an HF `tokenizers.Tokenizer` and adds what the engine needs: BOS policy, eos ids, the chat template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# o200k (tiktoken's o200k_base, gpt-oss): a word is an optional non-letter, then upper/titlecase letters followed by
# lowercase ones (or the reverse), with a contraction kept on the word; digits in threes; `/` stays with punctuation.
_O200K_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])  # fmt: skip
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    r"[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_DEEPSEEK_LLM_LETTERS = (
    "\u0041-\u005a\u0061-\u007a\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf"
    "\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15"
    "\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM_SPLITS = [
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
    r"\s?[!-/:-~\uFF01-\uFF0F\uFF1A-\uFF5E\u2018-\u201F\u3000-\u3002]+",
    r"\s+$",
    r"[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+",
    r"\p{N}+",
]
# tokenizer.ggml.pre (the names llama.cpp's converter writes) → regexes applied in turn, each splitting the pieces the
# previous one left, as llama.cpp does. None means GPT-2's own regex (ByteLevel with use_regex). SmolLM/StarCoder
# isolate each digit first. Seed families: gpt-oss `gpt-4o`; DeepSeek V3/R1 `deepseek-v3`; R1-Distill-Qwen
# `deepseek-r1-qwen` (older files: `qwen2`); R1-Distill-Llama / Llama 3 `llama-bpe`; SmolLM2 `smollm`.
PRE_TOKENIZER_SPLITS: dict[str, list[str] | None] = {
    "gpt2": None,
    "gpt-2": None,
    "default": None,
    "smollm": [r"\p{N}"],
    "starcoder": [r"\p{N}"],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
    "dbrx": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "deepseek-v3": _DEEPSEEK_V3_SPLITS,
    "deepseek-llm": _DEEPSEEK_LLM_SPLITS,
    "gpt-4o": [_O200K_SPLIT],
}
_GPT2_REGEX_PRES = {"gpt2", "gpt-2", "default", "smollm", "starcoder"}  # these end with GPT-2's regex
_IGNORE_MERGES_PRES = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"}  # llama.cpp: whole-word vocab hit wins


class Tokenizer:
    """Text ↔ token ids for one model, with its special tokens and chat template."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 add_bos: bool = False, chat_template: str | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, tok in added.items() if tok.special)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids. BOS only if the model asks.
        Encodes through `encode_batch`, which releases the GIL (`encode` holds it), so other threads keep running."""
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a .gguf file's vocabulary or an HF folder; ValueError if it cannot be built."""
    if os.path.isdir(path):
        return _from_hf_folder(path)
    return _from_gguf(path)


# --- GGUF -----------------------------------------------------------------------------------------------------------


def _read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file (never tensor data)."""
    from hearth.loader.gguf import open_gguf

    metadata = open_gguf(path, check_types=False).metadata
    return {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table that byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _from_gguf(path: str) -> Tokenizer:
    meta = _read_gguf_tokenizer_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if kind == "gpt2":
        try:
            backend = _byte_level_bpe(tokens, types, meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, types, meta)
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    # control tokens are special (skipped on decode); user-defined ones are matched whole but kept in decoded text
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    )
    eos_keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")]
    eos_ids = [meta[k] for k in eos_keys if k in meta]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # SentencePiece vocabularies default to BOS
    return Tokenizer(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
                     add_bos=bool(add_bos), chat_template=meta.get("tokenizer.chat_template"))  # fmt: skip


def _byte_level_bpe(tokens: list[str], types: list[int], meta: dict[str, Any]) -> Backend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"unknown GGUF pre-tokenizer {pre!r} (supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    whole = (TOKEN_CONTROL, TOKEN_USER_DEFINED)  # matched as written, never byte-spelled
    if not set("".join(t for t, k in zip(tokens, types) if k not in whole)) <= alphabet:  # one check for the vocabulary
        tokens = [t if k in whole or set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
                  for t, k in zip(tokens, types)]  # fmt: skip  # some converters store raw text
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))  # a repeated token keeps its first id
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES_PRES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre] or []]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in _GPT2_REGEX_PRES)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: dict[str, Any]) -> Backend:
    """SentencePiece BPE (`llama` vocab): ▁ for spaces, merges ranked by token score, unknown bytes as <0xXX>."""
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, types, list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges the pair whose joined piece scores highest; rebuild that order as a ranked merge list."""
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for tok, i in vocab.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --- HF folder ------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _from_hf_folder(folder: str) -> Tokenizer:
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{folder}: no tokenizer.json")
    backend = Backend.from_file(file)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    generation = _read_json(os.path.join(folder, "generation_config.json"))

    bos = _token_content(config.get("bos_token"))
    bos_id = backend.token_to_id(bos) if bos else generation.get("bos_token_id")
    eos_ids = []
    eos = _token_content(config.get("eos_token"))
    if eos and backend.token_to_id(eos) is not None:
        eos_ids.append(backend.token_to_id(eos))
    gen_eos = generation.get("eos_token_id")
    eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])

    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:  # no flag: does the post-processor of tokenizer.json put BOS in front?
        first = backend.encode("a", add_special_tokens=True).ids[:1]
        add_bos = bos_id is not None and first == [bos_id] != backend.encode("a", add_special_tokens=False).ids[:1]

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=add_bos, chat_template=template)
