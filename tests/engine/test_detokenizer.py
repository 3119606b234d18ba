"""IncrementalDetokenizer on real SmolLM2 token streams: split characters, stop strings, flush."""

from __future__ import annotations

import random

import pytest

from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.loader.resolve import embedded_model_path
from hearth.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(embedded_model_path())


def stream(tok: Tokenizer, ids: list[int], stop: list[str] | None = None, chunk: int = 1, **kwargs):
    """Feed `ids` `chunk` at a time; returns (pieces emitted, stop hit)."""
    detok = IncrementalDetokenizer(tok, stop=stop, **kwargs)
    pieces, hit = [], False
    for i in range(0, len(ids), chunk):
        text, hit = detok.step(ids[i : i + chunk])
        pieces.append(text)
        if hit:
            return pieces, True
    pieces.append(detok.flush())
    return pieces, hit


def expected(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@pytest.mark.parametrize("char", ["😀", "👨‍👩‍👧‍👦", "日", "語", "🇫🇷", "é"])
def test_split_characters_never_emitted_half(tok: Tokenizer, char: str) -> None:
    text = f"a {char}{char} b {char}"
    ids = tok.encode(text)
    if char != "é":  # the point of the test: this character really is spread over several byte tokens
        assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, hit = stream(tok, ids)
    assert not hit and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("你好！Hello 👋")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.step([i])[0] for i in ids) + detok.flush()
    assert out == "你好！Hello 👋"


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_concatenate_to_full_decode(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    ids = [rng.randrange(17, tok.vocab_size) for _ in range(300)]  # includes lone byte tokens
    for chunk in (1, 3):
        pieces, hit = stream(tok, ids, chunk=chunk)
        assert not hit and "".join(pieces) == tok.decode(ids)


def test_special_tokens_kept_or_skipped(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>there")
    assert "".join(stream(tok, ids)[0]) == "hithere"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "hi<|im_end|>there"


def test_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 你好世界 😀 " * 40)
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.step([i])
        assert len(detok.token_ids) - detok.window_start <= 12
    assert len(ids) > 400


def test_stop_spanning_tokens_and_steps(tok: Tokenizer) -> None:
    text = "Hello world. The end is near, said the bot."
    ids = tok.encode(text)
    assert len(tok.encode("The end is")) > 1
    for chunk in (1, 2, 5, len(ids)):
        pieces, hit = stream(tok, ids, stop=["The end is"], chunk=chunk)
        assert hit and "".join(pieces) == "Hello world. "
        assert all("The" not in p for p in pieces)


def test_stop_inside_a_token(tok: Tokenizer) -> None:
    pieces, hit = stream(tok, tok.encode("unbelievable results"), stop=["liev"])
    assert hit and "".join(pieces) == "unbe"


def test_stop_at_the_very_start(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["Hello"])
    assert detok.step(tok.encode("Hello world")) == ("", True)
    assert detok.step(tok.encode(" more")) == ("", True)
    assert detok.flush() == ""


def test_multiple_stops_first_occurrence_wins(tok: Tokenizer) -> None:
    text = "alpha beta gamma delta"
    for stop in (["delta", "beta"], ["beta", "delta"], ["gamma", "a b"]):
        pieces, hit = stream(tok, tok.encode(text), stop=stop)
        assert ("".join(pieces), hit) == expected(text, stop)


def test_overlapping_candidates(tok: Tokenizer) -> None:
    # "abcd" is a candidate until "e" arrives; "bce" then matches, starting inside the held-back text
    pieces, hit = stream(tok, tok.encode("xabce tail"), stop=["abcd", "bce"])
    assert hit and "".join(pieces) == "xa"
    pieces, hit = stream(tok, tok.encode("a <b> <stop> c"), stop=["<stop>", "<sto!"])
    assert hit and "".join(pieces) == "a <b> "


def test_held_back_text_released_when_no_stop(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["</answer>"])
    out = "".join(detok.step([i])[0] for i in tok.encode("x </ans"))
    assert out == "x "  # "</ans" could still become the stop string
    assert detok.step(tok.encode("wers y")) == ("</answers y", False)
    assert detok.flush() == ""


def test_flush_releases_partial_stop(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["END OF TEXT"])
    out = "".join(detok.step([i])[0] for i in tok.encode("the story ends. END OF"))
    assert out == "the story ends. "
    assert detok.flush() == "END OF"


@pytest.mark.parametrize("seed", range(20))
def test_random_text_with_stops_matches_reference(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", "b", " ", "c", "ab", "日", "😀", "\n"]) for _ in range(rng.randrange(1, 40)))
    stop = rng.sample(["ab", "b c", "cab", "日😀", "a\n", "bb b", "c日"], k=rng.randrange(1, 4))
    ids = tok.encode(text)
    pieces, hit = stream(tok, ids, stop=stop, chunk=rng.randrange(1, 4))
    assert ("".join(pieces), hit) == expected(tok.decode(ids), stop)
