"""The engine on the embedded model: batching changes nothing, prefix hits change nothing, aborts free everything."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from hearth.config import EngineConfig
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.llm_engine import LLMEngine
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine():
    # float32: the reference path, so that batch shape cannot change a greedy choice through rounding
    return LLMEngine(resolve_model("smollm2"), EngineConfig(max_model_len=1024, max_num_seqs=16,
                                                            max_num_batched_tokens=96, dtype="float32"))  # fmt: skip


def drain(engine: LLMEngine, outputs: dict) -> None:
    for delta in engine.step():
        outputs.setdefault(delta.request_id, []).extend(delta.token_ids)


def prompts(engine, n=16, seed=0):
    rng = random.Random(seed)
    words = ["the", "a", "river", "mountain", "city", "light", "old", "new", "song", "river", "cloud", "stone",
             "quick", "idea", "paper"]  # fmt: skip
    return [engine.tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(3, 120)))) for _ in range(n)]


def test_batched_equals_unbatched(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = prompts(engine)
    alone = {}
    for i, p in enumerate(ps):
        engine.add_request(p, params, f"alone-{i}")
        while engine.has_unfinished():
            drain(engine, alone)
    together: dict = {}
    pending = list(enumerate(ps))
    while pending or engine.has_unfinished():
        for _ in range(min(len(pending), 3)):  # arrivals at different times, mixed with running decodes
            i, p = pending.pop(0)
            engine.add_request(p, params, f"together-{i}")
        drain(engine, together)
    for i in range(len(ps)):
        assert together[f"together-{i}"] == alone[f"alone-{i}"], i
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_prefix_cache_hit_gives_the_same_output(engine):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    system = engine.tokenizer.encode("You are a careful assistant who answers in one sentence. " * 6)
    first = system + engine.tokenizer.encode(" Tell me about rivers.")
    engine.add_request(first, params, "miss")
    out: dict = {}
    while engine.has_unfinished():
        drain(engine, out)
    seq_params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seq = engine.add_request(first, seq_params, "hit")
    while engine.has_unfinished():
        drain(engine, out)
    assert seq.num_cached_tokens >= engine.engine_config.block_size * (len(first) // engine.engine_config.block_size - 1)
    assert out["hit"] == out["miss"]


@pytest.fixture(scope="module")
def bf16_llama_576(tmp_path_factory):
    """A random Llama with SmolLM2's widths (hidden 576, where the bf16 GEMV kernel and oneDNN round differently)."""
    from conftest import save_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    return save_tiny(model, str(tmp_path_factory.mktemp("llama-576")))


@pytest.mark.parametrize("model", ["smollm2", "bf16_llama_576"])
def test_bf16_prefix_hit_computes_exactly_what_the_miss_did(model, request):
    # in bf16 too a hit's tail (1 to 16 tokens: one token alone is still prefill, not a decode row) takes the same
    # arithmetic as the whole prompt, for GGUF blocks and for dense bf16 weights: the first token's logprobs are equal
    # bit for bit, and so the answers
    from hearth import LLM

    folder = "smollm2" if model == "smollm2" else request.getfixturevalue(model)
    llm = LLM(folder, dtype="bfloat16", max_model_len=128, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=5)
    rng = random.Random(3)
    for i, length in enumerate((33, 34, 36, 37, 47, 48)):  # tails of 1, 2, 4, 5, 15 and 16 tokens after two blocks
        ids = [rng.randint(1000, 9000) for _ in range(length)] if model == "smollm2" else list(range(10 + i, 10 + i + length))
        miss, hit = (llm.generate([ids], params)[0] for _ in range(2))
        assert miss.num_cached_tokens == 0 and hit.num_cached_tokens == 32
        assert hit.token_ids == miss.token_ids
        for a, b in zip(hit.logprobs, miss.logprobs):
            assert (a.token_id, a.logprob) == (b.token_id, b.logprob)
            assert a.top == b.top


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    ps = prompts(engine, n=2, seed=3)
    runs = []
    for r in range(2):
        out: dict = {}
        for i, p in enumerate(ps):
            engine.add_request(p, params, f"seed-{r}-{i}")
        while engine.has_unfinished():
            drain(engine, out)
        runs.append([out[f"seed-{r}-{i}"] for i in range(len(ps))])
    assert runs[0] == runs[1]


def test_prompt_too_long_is_refused(engine):
    from hearth.engine.protocol import EngineError

    with pytest.raises(EngineError) as e:
        engine.add_request([5] * 1024, SamplingParams(), "long")
    assert e.value.status == 400 and "1024" in str(e.value)


def test_async_engine_admits_a_follow_up_into_the_next_step(engine, monkeypatch):
    # A finishes while a long prompt is still being prefilled: the engine thread waits (admission_wait_ms) before the
    # next step, so the request the client sends on A's last token joins that very step
    monkeypatch.setattr(engine.engine_config, "admission_wait_ms", 2000.0)  # generous: CI machines stall
    async_engine = AsyncEngine(engine)
    admitted, step_ends = {}, []
    add, step = engine.scheduler.add, engine.step

    def recording_add(seq):
        add(seq)
        admitted[seq.request_id] = seq.arrival_step

    def recording_step():
        deltas = step()
        step_ends.append((engine.scheduler.num_steps, {d.request_id for d in deltas if d.finished}))
        return deltas

    monkeypatch.setattr(engine.scheduler, "add", recording_add)
    monkeypatch.setattr(engine, "step", recording_step)
    short, long = prompts(engine, 1, seed=3)[0][:20], prompts(engine, 8, seed=4)
    long = [t for p in long for t in p][:400]  # about 5 steps of 96 tokens

    async def run(request_id, ids, max_tokens, then=None):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        async for delta in async_engine.generate(ids, params, request_id):
            if delta.finished and then is not None:
                await then()

    async def scenario():
        await asyncio.gather(run("a", short, 1, then=lambda: run("b", short[:10], 1)), run("long", long, 2))

    try:
        asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    a_step = next(n for n, done in step_ends if "a" in done)
    assert admitted["b"] == a_step  # scheduled in the first step after A's, no step in between
    assert not engine.has_unfinished()


def test_admission_wait_follows_a_finished_request_while_prefill_waits(engine, monkeypatch):
    # the policy AsyncEngine asks before each step: wait only right after a step that finished a request, when the
    # next step will prefill
    monkeypatch.setattr(engine.engine_config, "admission_wait_ms", 50.0)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    long = [t for p in prompts(engine, 8, seed=404) for t in p][:300]  # over three steps of 96 tokens
    engine.add_request(prompts(engine, 1, seed=405)[0][:8], params, "short")
    engine.add_request(long, params, "long")
    deltas = engine.step()  # "short" and the start of "long"
    assert [d.request_id for d in deltas if d.finished] == ["short"]
    assert engine.admission_wait_s() == 0.05
    assert engine.step() == [] and engine.admission_wait_s() == 0  # prefill goes on, nothing finished
    while engine.has_unfinished():
        engine.step()
    assert engine.admission_wait_s() == 0  # "long" finished, but nothing waits to be prefilled
    monkeypatch.setattr(engine.engine_config, "admission_wait_ms", 0.0)
    engine.add_request(prompts(engine, 1, seed=405)[0][:8], params, "short-2")
    engine.add_request(long, params, "long-2")
    engine.step()
    assert engine.admission_wait_s() == 0  # 0 ms: never wait
    while engine.has_unfinished():
        engine.step()


def test_preemption_by_recompute_keeps_outputs(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = [sum(prompts(engine, n=6, seed=11 + i), [])[:120] for i in range(4)]  # 8 blocks each, 9 once decoding
    expected: dict = {}
    for i, p in enumerate(ps):
        engine.add_request(p, params, f"roomy-{i}")
    while engine.has_unfinished():
        drain(engine, expected)
    # a pool of 16 blocks holds two 120-token prompts, not their continuations: one is preempted and recomputed
    small = LLMEngine(resolve_model("smollm2"), EngineConfig(max_model_len=256, max_num_seqs=4, dtype="float32",
                                                             kv_cache_memory=f"{256 * 23040 * 2}b"))  # fmt: skip
    assert small.scheduler.block_manager.num_blocks * small.engine_config.block_size == 256
    seqs = [small.add_request(p, params, f"tight-{i}") for i, p in enumerate(ps)]
    got: dict = {}
    while small.has_unfinished():
        drain(small, got)
    assert sum(s.num_preemptions for s in seqs) > 0
    for i in range(len(ps)):
        assert got[f"tight-{i}"] == expected[f"roomy-{i}"]
    assert small.scheduler.block_manager.num_free_blocks == small.scheduler.block_manager.num_blocks


@pytest.mark.parametrize("bad", [{"admission_wait_ms": -1}, {"admission_wait_ms": 5000}, {"max_num_seqs": 0},
                                 {"scheduling_policy": "random"}])  # fmt: skip
def test_engine_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)
