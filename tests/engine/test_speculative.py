"""Speculative decoding: verification keeps the target's distribution, greedy output is plain decoding's token for
token (SmolLM2 with prompt lookup; a tiny random Llama through preemption, prefix hits and aborts), no block leaks."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.speculative import NgramProposer, Speculator
from hearth.layers.rejection_sampler import process_row, verify
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import SamplingParams

# ------------------------------------------------------------------------------------------- rejection sampling


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square critical value at significance 0.001 (z = 3.09), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = float(counts.sum())
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target gives probability 0 was emitted"
    expected = probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("draft_kind", ["point", "distribution"])
def test_verification_keeps_the_target_distribution(draft_kind):
    torch.manual_seed(1)
    vocab = 12
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.8, top_k=10)
    p = torch.stack([process_row(row, [0], 1, params) for row in logits])
    if draft_kind == "point":  # prompt lookup: always the same guesses, not the target's favourites
        drafts, q = [int(p[0].argsort()[-3]), int(p[1].argmin())], None
    else:  # a deliberately bad draft model: its distribution is far from the target's, and drafts come from it
        q = torch.softmax(torch.randn(2, vocab) * 3, -1)
        drafts = None
    n = 20000
    gen = torch.Generator().manual_seed(7)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)  # the second token, when the first draft was kept
    for _ in range(n):
        guess = drafts if q is None else [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        tokens = verify(logits, [0], 1, params, guess, q, gen)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            assert tokens[0] == guess[0]
            second[tokens[1]] += 1
    stat, df = chi2(first, p[0])
    assert stat < chi2_critical(df), (stat, df)
    # after a kept first draft, the second token follows row 1 of the target (the row after that draft)
    stat, df = chi2(second, p[1])
    assert second.sum() > 1000 and stat < chi2_critical(df), (stat, df)


def test_a_biased_sampler_fails_the_chi_square_test():
    """The test above can fail: always keeping the draft (the bug it guards against) is caught."""
    torch.manual_seed(1)
    logits = torch.randn(2, 12) * 1.5
    params = SamplingParams(temperature=0.8)
    p = process_row(logits[0], [0], 1, params)
    draft = int(p.argmin())
    counts = torch.zeros(12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20000):
        kept = bool(torch.rand((), generator=gen) < 0.5)  # keeps the draft far more often than p(x) / 1
        counts[draft if kept else int(torch.multinomial(p, 1, generator=gen))] += 1
    stat, df = chi2(counts, p)
    assert stat > chi2_critical(df)


def test_greedy_verification_is_argmax_decoding_with_penalties():
    torch.manual_seed(0)
    logits = torch.randn(5, 20)
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    history = [3, 4, 5]

    def plain(j, hist):  # what the plain sampler picks after hist
        row = logits[j].clone()
        ids = torch.tensor(sorted(set(hist)))
        row[ids] = torch.where(row[ids] > 0, row[ids] / 1.3, row[ids] * 1.3)
        return int(row.argmax())

    expected = []
    for j in range(5):
        expected.append(plain(j, history + expected))
    assert verify(logits, history, 1, params, expected[:4], None, torch.Generator()) == expected
    wrong = expected[:2] + [(expected[2] + 1) % 20, expected[3]]
    assert verify(logits, history, 1, params, wrong, None, torch.Generator()) == expected[:3]


def test_ngram_lookup():
    lookup = NgramProposer(2, 3).lookup
    assert lookup([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # the suffix [2, 3] seen before: what followed it
    assert lookup([1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 2, 3], 3) == [7, 8, 2]  # the latest match wins
    assert lookup([5, 6, 7, 8], 3) == []
    assert lookup([1, 2, 1, 2], 4) == [1, 2]  # the continuation may run into the suffix itself
    assert lookup([1, 2, 3, 1, 2, 3, 1, 2], 0) == []


def test_adaptive_k():
    config = EngineConfig(speculative="ngram", num_speculative_tokens=4)
    spec = Speculator(config, NgramProposer(1, 2), max_model_len=100)

    class Seq:
        spec_k, spec_skip, spec_misses, spec_pauses, spec_last, num_draft_tokens = -1, 0, 0, 0, None, 0

    seq = Seq()
    spec.adapt(seq)
    assert seq.spec_k == 4
    seq.spec_last = (4, 1)
    spec.adapt(seq)
    assert seq.spec_k == 2  # shrinks to what was kept, plus one
    seq.spec_last = (2, 2)
    spec.adapt(seq)
    assert seq.spec_k == 3
    for _ in range(3):
        seq.spec_last = (3, 0)
        spec.adapt(seq)
    assert seq.spec_k == 1 and seq.spec_skip == 8  # three misses in a row: paused
    for _ in range(3):
        seq.spec_last = (1, 0)
        spec.adapt(seq)
    assert seq.spec_skip == 16  # the next pause is longer


# ------------------------------------------------------------------------------------------------- the engine


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], arrivals: int = 1000,
        seqs: list | None = None) -> list[list[int]]:  # fmt: skip
    """Every request's output tokens; `arrivals` requests join before each step; `seqs` collects the Sequences."""
    outputs: dict[str, list[int]] = {}
    pending = [(f"r{i}", ids, params) for i, (ids, params) in enumerate(requests)]
    while pending or engine.has_unfinished():
        for rid, ids, params in pending[:arrivals]:
            seq = engine.add_request(ids, params, rid)
            if seqs is not None:
                seqs.append(seq)
        del pending[:arrivals]
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    return [outputs[f"r{i}"] for i in range(len(requests))]


def run_plain(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], **kwargs) -> list[list[int]]:
    """`run` with speculation off, put back afterwards even when the run fails (the engine fixtures are shared)."""
    speculator, engine.speculator = engine.speculator, None
    try:
        return run(engine, requests, **kwargs)
    finally:
        engine.speculator = speculator


def repeating_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = ["river", "stone", "light", "old", "city", "song", "cloud", "paper", "quick", "idea", "north", "green"]
    out = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        kind = rng.randrange(3)
        if kind == 0:
            text = f"Repeat the line three times.\nLine: {sentence}\n1. {sentence}\n2."
        elif kind == 1:
            text = f"def f_{sentence.split()[0]}(x):\n    return x + 1  # {sentence}\n\ndef g(x):\n    return x"
        else:
            text = f"Copy: {sentence}. Copy: {sentence}. Copy:"
        out.append(tokenizer.encode(text))
    return out


@pytest.fixture(scope="module")
def smollm2_engine():
    # float32: the reference path, so that the rows' layout cannot change a greedy choice through rounding;
    # speculative_max_batch above max_num_seqs: every step may speculate (the default turns it off above 2 decoding)
    config = EngineConfig(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256, dtype="float32",
                          speculative="ngram", num_speculative_tokens=4, speculative_max_batch=8)  # fmt: skip
    return LLMEngine(resolve_model("smollm2"), config)


def test_ngram_greedy_equals_plain_decoding_on_smollm2(smollm2_engine):
    engine = smollm2_engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    requests = [(ids, params) for ids in repeating_prompts(engine.tokenizer, 32)]
    plain = run_plain(engine, requests, arrivals=4)
    drafted, kept = engine.scheduler.num_draft_tokens, engine.scheduler.num_accepted_tokens
    speculative = run(engine, requests, arrivals=4)
    for i, (a, b) in enumerate(zip(plain, speculative)):
        assert a == b, i
    assert engine.scheduler.num_accepted_tokens - kept > 32  # drafts were kept...
    assert engine.scheduler.num_draft_tokens - drafted > engine.scheduler.num_accepted_tokens - kept  # ...and rejected
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_ngram_stops_where_plain_decoding_stops(smollm2_engine):
    """A stop token or stop string inside the kept drafts ends the output where plain decoding ends it."""
    engine = smollm2_engine
    (prompt,) = repeating_prompts(engine.tokenizer, 1, seed=5)
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    (reference,) = run_plain(engine, [(prompt, free)])
    text = engine.tokenizer.decode(reference)
    stop_token = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[reference[9]])
    stop_string = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[text[len(text) // 2 :][:6]])
    results = run(engine, [(prompt, stop_token), (prompt, stop_string), (prompt, free)])
    assert results[0] == reference[: reference.index(reference[9]) + 1]
    assert results[2] == reference
    (expected,) = run_plain(engine, [(prompt, stop_string)])
    assert results[1] == expected and len(expected) < len(reference)


def test_seeded_sampling_is_reproducible_with_speculation(smollm2_engine):
    engine = smollm2_engine
    prompts = repeating_prompts(engine.tokenizer, 2, seed=3)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=11, ignore_eos=True)
    first = run(engine, [(p, params) for p in prompts])
    second = run(engine, [(p, params) for p in prompts])
    assert first == second


@pytest.fixture(scope="module")
def tiny_engine_factory(tiny_llama3):
    path, _ = tiny_llama3

    def make(**kwargs):
        config = dict(max_model_len=96, max_num_seqs=6, max_num_batched_tokens=64, dtype="float32", block_size=4)
        config.update(kwargs)
        return LLMEngine(resolve_model(path), EngineConfig(**config))

    return make


def tiny_prompts(n: int, seed: int) -> list[list[int]]:
    """Byte prompts that repeat themselves (drafts to find), some sharing a long prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(32, 127) for _ in range(20)]
    out = []
    for i in range(n):
        unit = [rng.randrange(32, 127) for _ in range(rng.randint(2, 6))]
        body = unit * rng.randint(2, 5)
        out.append((shared if i % 2 else []) + body)
    return out


def test_preemption_and_prefix_hits_change_nothing(tiny_engine_factory):
    # a pool far smaller than the batch needs: sequences get preempted, mid-speculation too
    plain = tiny_engine_factory(kv_cache_memory="60KiB")
    spec = tiny_engine_factory(kv_cache_memory="60KiB", speculative="ngram", speculative_max_batch=8,
                               prompt_lookup_min=1)  # fmt: skip
    rng = random.Random(0)
    requests = [(p, SamplingParams(temperature=0, max_tokens=rng.randint(8, 40), ignore_eos=True))
                for p in tiny_prompts(24, seed=1)]  # fmt: skip
    expected = run(plain, requests, arrivals=3)
    seqs: list = []
    got = run(spec, requests, arrivals=3, seqs=seqs)
    assert got == expected
    sched = spec.scheduler
    assert sched.num_accepted_tokens > 0 and sched.num_draft_tokens > sched.num_accepted_tokens
    assert sum(s.num_preemptions for s in seqs) > 0
    assert sum(s.num_cached_tokens for s in seqs) > 0
    assert any(s.num_preemptions and s.num_draft_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_no_block_leaks_with_random_requests_and_aborts(tiny_engine_factory):
    engine = tiny_engine_factory(kv_cache_memory="80KiB", speculative="ngram", speculative_max_batch=8,
                                 prompt_lookup_min=1, num_speculative_tokens=6)  # fmt: skip
    bm = engine.scheduler.block_manager
    rng = random.Random(3)
    prompts = tiny_prompts(40, seed=2)
    live: list[str] = []
    aborted_with_drafts = 0
    for i in range(300):
        params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 30), seed=rng.choice([None, i]),
                                ignore_eos=True)  # fmt: skip
        engine.add_request(rng.choice(prompts), params, f"q{i}")
        live.append(f"q{i}")
        for _ in range(rng.randint(0, 3)):
            for delta in engine.step():
                if delta.finished:
                    live.remove(delta.request_id)
        if live and rng.random() < 0.3:
            victim = rng.choice(live)
            seq = engine.seqs[victim]
            aborted_with_drafts += seq.num_draft_tokens > 0 and seq.num_computed_tokens > 0
            engine.abort(victim)
            live.remove(victim)
    while engine.has_unfinished():
        engine.step()
    assert aborted_with_drafts > 5
    assert engine.scheduler.num_accepted_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.seqs


def test_smollm2_as_its_own_draft_model_gives_plain_greedy_output(smollm2_engine):
    engine = smollm2_engine
    path = resolve_model("smollm2").path
    config = EngineConfig(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256, dtype="float32",
                          draft_model=path, num_speculative_tokens=3, speculative_max_batch=8)  # fmt: skip
    drafted = LLMEngine(resolve_model("smollm2"), config)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    requests = [(ids, params) for ids in repeating_prompts(engine.tokenizer, 8, seed=9)]
    expected = run_plain(engine, requests, arrivals=4)
    assert run(drafted, requests, arrivals=4) == expected
    sched = drafted.scheduler
    assert sched.num_accepted_tokens >= 0.9 * sched.num_draft_tokens > 0  # the same model guesses itself
    proposer = drafted.speculator.proposer
    assert not proposer.mirrors and proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama3):
    path, _ = tiny_llama3
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(resolve_model(path), EngineConfig(max_model_len=64, dtype="float32", draft_model="smollm2"))


def test_draft_model_through_preemption_aborts_and_sampling(tiny_engine_factory, tiny_llama3):
    path, _ = tiny_llama3
    plain = tiny_engine_factory(kv_cache_memory="60KiB")
    spec = tiny_engine_factory(kv_cache_memory="60KiB", draft_model=path, speculative_max_batch=8)
    rng = random.Random(4)
    requests = [(p, SamplingParams(temperature=0, max_tokens=rng.randint(8, 30), ignore_eos=True))
                for p in tiny_prompts(16, seed=5)]  # fmt: skip
    seqs: list = []
    assert run(spec, requests, arrivals=3, seqs=seqs) == run(plain, requests, arrivals=3)
    assert sum(s.num_preemptions for s in seqs) > 0 and spec.scheduler.num_accepted_tokens > 0
    sampled = [(p, SamplingParams(temperature=0.9, max_tokens=20, seed=i, ignore_eos=True)) for i, (p, _) in
               enumerate(requests)]  # fmt: skip
    assert run(spec, sampled, arrivals=3) == run(spec, sampled, arrivals=3)  # seeded: reproducible
    for i, (p, params) in enumerate(sampled[:6]):
        spec.add_request(p, params, f"a{i}")
    for _ in range(4):
        spec.step()
    for i in range(6):
        spec.abort(f"a{i}")
    proposer = spec.speculator.proposer
    for bm in (spec.scheduler.block_manager, proposer.block_manager):
        assert bm.num_free_blocks == bm.num_blocks
    assert not proposer.mirrors


def test_fused_decode_verification_equals_plain_decoding_in_bf16():
    """In the default dtype (GGUF blocks, bf16) decode steps take the fused C step; verification rows go through it
    too, each computed as the decode of its token, so greedy output stays plain decoding's token for token. The
    requests arrive together: rows that decode or verify in a step that also prefills go through the model's torch
    forward instead (bf16 residual stream, prefill attention for a verified chunk), whose rounding is not the fused
    step's, and which of a run's tokens land in such steps depends on how many were drafted (on an AVX2-only CPU
    two arrivals a step parted the runs at a 0.03-logprob tie)."""
    config = EngineConfig(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256, speculative="ngram",
                          speculative_max_batch=8)  # fmt: skip
    engine = LLMEngine(resolve_model("smollm2"), config)
    if engine.runner.fused_decode is None:
        pytest.skip("no fused decode step on this machine (C kernels)")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    requests = [(ids, params) for ids in repeating_prompts(engine.tokenizer, 6, seed=21)]
    expected = run_plain(engine, requests)
    assert run(engine, requests) == expected
    assert engine.scheduler.num_accepted_tokens > 6


def test_logprobs_with_speculation_are_plain_decodings(tiny_engine_factory):
    plain = tiny_engine_factory()
    spec = tiny_engine_factory(speculative="ngram", prompt_lookup_min=1, speculative_max_batch=8)
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True)
    prompts = tiny_prompts(4, seed=8)

    def logprobs(engine):
        seqs = [engine.add_request(p, params, f"lp{i}") for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        return [[(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in s.logprobs] for s in seqs]

    expected = logprobs(plain)
    assert logprobs(spec) == expected and all(len(x) == 20 for x in expected)
    assert spec.scheduler.num_accepted_tokens > 0


def test_a_grammar_request_is_never_drafted_and_still_holds(smollm2_engine):
    """Drafts would be verified without a grammar's mask, so a constrained sequence gets none; the free sequences
    beside it in the same batches still speculate and match plain decoding."""
    from hearth.sampling_params import Grammar

    engine = smollm2_engine
    prompts = repeating_prompts(engine.tokenizer, 3, seed=7)
    prompts[0] = engine.tokenizer.encode("Codes: 123-ab, 123-ab, 123-ab, 123-ab, 123-ab. Next code:")  # n-grams to draft
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=40, grammar=Grammar("regex", "[0-9]{3}-[a-z]{2}"))
    requests = [(prompts[0], constrained), (prompts[1], free), (prompts[2], free)]
    plain = run_plain(engine, requests)
    drafted = engine.scheduler.num_draft_tokens
    seqs: list = []
    max_batch, engine.speculator.max_batch = engine.speculator.max_batch, 8  # all three would be drafted for
    try:
        speculative = run(engine, requests, seqs=seqs)
    finally:
        engine.speculator.max_batch = max_batch
    assert speculative == plain
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", engine.tokenizer.decode(speculative[0])), speculative[0]
    assert seqs[0].num_draft_tokens == 0 and engine.scheduler.num_draft_tokens > drafted
