"""Grammar-constrained decoding in the engine (engine/structured.py): where the constraint starts (after `</think>`,
after harmony's final header, not on a trigger in the prompt), masks against a bit-by-bit reference, and on the
embedded SmolLM2 through LLM: regex and Lark kinds, finish reasons, and unconstrained neighbours left untouched.

The trigger tests drive the engine's pieces (Grammars, SequenceGrammar, Sampler) with a scripted model: logits that
prefer the script's next token, so the output is the script wherever the grammar lets it be.
"""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.pre_tokenizers import ByteLevel

from hearth.engine.sequence import Sequence
from hearth.engine.structured import Grammars, SequenceGrammar, banned_tokens, json_schema_text
from hearth.layers.sampler import Sampler
from hearth.sampling_params import Grammar, SamplingParams
from hearth.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<|channel|>", "<|message|>", "<|end|>", "<|start|>",
            "<|constrain|>", "<|call|>", "<|return|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"]  # fmt: skip
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "maximum": 9,
          "minimum": 0}}, "required": ["answer", "n"], "additionalProperties": False}  # fmt: skip


def byte_tokenizer() -> Tokenizer:
    """Bytes as tokens 0..255, then the special tokens of the think, harmony and DeepSeek formats."""
    alphabet = sorted(ByteLevel.alphabet())[:256]
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return Tokenizer(backend, eos_token_ids=[backend.token_to_id("<|endoftext|>")])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_tokenizer()


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def scripted_decode(tokenizer: Tokenizer, grammar: Grammar, script: list[int], prompt: list[int],
                    stop_ids: tuple[int, ...] = (), max_tokens: int = 300,
                    fallback: str = "lowest") -> tuple[list[int], str]:  # fmt: skip
    """Decode greedily with a model that wants `script` (then end of text); where the grammar masks the script's
    token it takes the lowest (or "highest") allowed id. Returns (output ids, finish reason)."""
    eos = tokenizer.eos_token_ids[0]
    grammars = Grammars(tokenizer, {eos})
    seq = Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar,
                                          stop_token_ids=list(stop_ids)))  # fmt: skip
    seq.grammar = grammars.sequence_grammar(grammar)
    sampler, vocab = Sampler(0), tokenizer.vocab_size
    for step in range(max_tokens):
        logits = torch.arange(vocab, dtype=torch.float32)[None] / vocab * (1 if fallback == "highest" else -1)
        logits[0, script[step] if step < len(script) else eos] = 10.0
        job = grammars.start([seq], vocab)
        (token,), _ = sampler(logits, [seq], [None], job.result() if job else None)
        seq.append_token(token)
        if token == eos or token in stop_ids:
            return seq.output_token_ids, "stop"
        if seq.grammar.accept(seq, token):
            return seq.output_token_ids, "stop"
    return seq.output_token_ids, "length"


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


# a thought that spells out markup as text would end the parsers' reasoning where the model did not
THOUGHT = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40).filter(
    lambda t: "<|" not in t and "think>" not in t
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thought=THOUGHT, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_think_reasoning_is_free_and_the_answer_after_it_is_constrained(tokenizer, thought, cuts):
    from hearth.chat.reasoning import ParsedDelta, ThinkParser

    end = tokenizer.token_to_id("</think>")
    grammar = Grammar("json_schema", json_schema_text(ANSWER), (end,))
    # the prompt opens the thought and holds an earlier </think>: neither starts the constraint
    prompt = encode(tokenizer, "<|start|>user: hi </think><think>\n")
    script = encode(tokenizer, thought) + [end] + encode(tokenizer, "Sure! {answer: maybe}")
    out, reason = scripted_decode(tokenizer, grammar, script, prompt)
    assert reason == "stop"
    assert out[: len(thought) + 1] == script[: len(thought) + 1]  # the thought, untouched by the grammar
    text = tokenizer.decode(out, skip_special_tokens=False)
    parser, parsed = ThinkParser(starts_in_reasoning=True), ParsedDelta()
    for piece in chunks(text, cuts):
        parsed.extend(parser.feed(piece))
    parsed.extend(parser.finish())
    assert parsed.reasoning == thought.lstrip()  # the parser drops the whitespace after <think>
    jsonschema.validate(json.loads(parsed.content), ANSWER)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thought=THOUGHT, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_harmony_analysis_is_free_and_the_final_channel_is_constrained(tokenizer, thought, cuts):
    from hearth.chat.harmony import HarmonyParser
    from hearth.chat.reasoning import ParsedDelta

    trigger = tuple(encode(tokenizer, "<|channel|>final<|message|>"))
    grammar = Grammar("json_schema", json_schema_text(ANSWER), trigger)
    ret = tokenizer.token_to_id("<|return|>")
    script = encode(tokenizer, f"<|channel|>analysis<|message|>{thought}<|end|><|start|>assistant"
                               "<|channel|>final<|message|>The answer is yes.<|return|>")  # fmt: skip
    out, reason = scripted_decode(tokenizer, grammar, script, encode(tokenizer, "<|start|>assistant"), (ret,))
    assert reason == "stop"
    free = script.index(trigger[-1]) + 1
    assert out[:free] == script[:free]
    text = tokenizer.decode(out, skip_special_tokens=False)
    parser, parsed = HarmonyParser(), ParsedDelta()
    for piece in chunks(text, cuts):
        parsed.extend(parser.feed(piece))
    parsed.extend(parser.finish())
    assert parsed.reasoning == thought
    jsonschema.validate(json.loads(parsed.content), ANSWER)


def test_without_a_trigger_the_constraint_starts_at_once_and_a_short_budget_is_length(tokenizer):
    grammar = Grammar("json_schema", json_schema_text(ANSWER))
    out, reason = scripted_decode(tokenizer, grammar, encode(tokenizer, "no JSON here"), [65])
    assert reason == "stop" and jsonschema.validate(json.loads(tokenizer.decode(out)), ANSWER) is None
    out, reason = scripted_decode(tokenizer, grammar, encode(tokenizer, "no JSON here"), [65], max_tokens=5)
    assert reason == "length" and len(out) == 5


def test_a_trigger_that_never_comes_leaves_the_output_free(tokenizer):
    grammar = Grammar("regex", "[0-9]+", (tokenizer.token_to_id("</think>"),))
    script = encode(tokenizer, "letters only, never digits")
    out, reason = scripted_decode(tokenizer, grammar, script, [65])
    assert reason == "stop" and out == script + tokenizer.eos_token_ids


def test_banned_tokens_are_the_unset_bits():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=gen)
    for vocab in (150, 160, 170):
        got = banned_tokens(words, vocab)
        want = [[not (t < 160 and (int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)]
        assert got.tolist() == want


def test_a_grammar_is_compiled_once_and_each_sequence_gets_its_own_matcher(tokenizer):
    grammars = Grammars(tokenizer, set(tokenizer.eos_token_ids))
    grammar = Grammar("regex", "ab+c")
    before = list(grammars.compiler._cache)  # the compiler is the tokenizer's, shared with the tests above
    one, two = grammars.sequence_grammar(grammar), grammars.sequence_grammar(grammar)
    assert isinstance(one, SequenceGrammar) and one.matcher is not two.matcher
    assert list(grammars.compiler._cache) == [*before, ("regex", "ab+c")]
    assert one.matcher.consume_tokens(encode(tokenizer, "abb")) and not two.matcher.consume_tokens(encode(tokenizer, "c"))


# --- the embedded SmolLM2 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from hearth.llm import LLM

    threads = torch.get_num_threads()
    os.environ.setdefault("HEARTH_NUM_THREADS", "1")
    yield LLM("smollm2", max_model_len=512, max_num_seqs=8)
    torch.set_num_threads(threads)


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_regex_and_lark_grammars_on_smollm2(llm):
    regex = Grammar("regex", r"[A-Z][a-z]+, [0-9]{4}")
    lark = Grammar("lark", 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"')
    outs = llm.generate([chat("Name a city and a year.")] * 2 + [chat("Is the sky blue?")] * 2,
                        SamplingParams(temperature=1, seed=7, max_tokens=40, grammar=regex))  # fmt: skip
    assert all(o.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]+, [0-9]{4}", o.text) for o in outs)
    (out,) = llm.generate([chat("Is the sky blue?")], SamplingParams(temperature=0, max_tokens=40, grammar=lark))
    assert out.finish_reason == "stop" and out.text in ("The answer is yes.", "The answer is no.")


@pytest.mark.slow
def test_a_constrained_request_leaves_its_unconstrained_neighbours_unchanged(llm):
    prompts = [chat("Write a haiku about the sea."), chat("List three fruits."), chat("Count to ten.")]
    params = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.token_ids for o in llm.generate(prompts, params)]
    grammar = Grammar("json_schema", json_schema_text(ANSWER))
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(llm.tokenizer.encode(prompt), params, f"free-{i}")
        engine.add_request(llm.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=24, grammar=grammar),
                           f"json-{i}")  # fmt: skip
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finished:
                reasons[delta.request_id] = delta.finish_reason
    assert [tokens[f"free-{i}"] for i in range(3)] == alone
    for i in range(3):
        assert reasons[f"json-{i}"] == "stop"
        jsonschema.validate(json.loads(llm.tokenizer.decode(tokens[f"json-{i}"])), ANSWER)
    assert not engine.grammars.live  # finished sequences leave the grammar path


def test_a_grammar_that_does_not_compile_is_refused_by_the_engine(llm):
    from hearth.engine.protocol import EngineError

    bad = SamplingParams(grammar=Grammar("json_schema", json_schema_text({"type": "array", "uniqueItems": True})))
    with pytest.raises(EngineError, match="uniqueItems") as info:
        llm.engine.add_request([1, 2, 3], bad, "bad")
    assert info.value.status == 400 and "bad" not in llm.engine.seqs


def test_the_sampler_never_picks_a_banned_token():
    class Row:
        def __init__(self, temperature: float) -> None:
            self.params, self.token_ids, self.num_prompt_tokens = SamplingParams(temperature=temperature), [1], 1

    gen = torch.Generator().manual_seed(0)
    seqs = [Row(0.0), Row(1.0), Row(0.0), Row(2.0)]
    for rows in ([0, 1, 2, 3], [1, 2]):
        for _ in range(20):
            logits = torch.randn(4, 50, generator=gen) * 5
            banned = torch.rand(len(rows), 50, generator=gen) < 0.9
            banned[:, 7] = False  # at least one allowed token per row
            tokens, _ = Sampler(0)(logits, seqs, [None] * 4, (rows, banned))
            assert all(not banned[k, tokens[i]] for k, i in enumerate(rows))
            free = [i for i in range(4) if i not in rows and seqs[i].params.is_greedy]
            assert all(tokens[i] == int(logits[i].argmax()) for i in free)  # unconstrained rows as without a mask
