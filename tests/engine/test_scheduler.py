"""Block manager and scheduler, scripted step by step (pure Python: no model)."""

from __future__ import annotations

import random

import pytest

from hearth.config import EngineConfig
from hearth.engine.block_manager import BlockManager, compute_hash
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence, SequenceStatus
from hearth.sampling_params import SamplingParams


def make(num_blocks=16, block_size=4, max_num_seqs=4, budget=16, prefix=True, windows=(None,), **kwargs):
    config = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          enable_prefix_caching=prefix)  # fmt: skip
    sched = Scheduler(config, num_blocks, windows, **kwargs)
    return sched.block_manager, sched


def seq(n, start=0, max_tokens=4):
    return Sequence(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler, bm: BlockManager, next_token=lambda s: 7, check=lambda batch: None):
    """One engine step without a model: schedule, sample `next_token` for the sequences the runner would sample
    (every token computed after this step), postprocess."""
    batch = sched.schedule()
    check(batch)
    sampled = [s for s, n in zip(batch.seqs, batch.num_scheduled_tokens) if s.num_computed_tokens + n == s.num_tokens]
    sched.postprocess(batch, sampled, [next_token(s) for s in sampled], [None] * len(sampled))
    return batch


def test_admission_and_chunked_prefill():
    bm, sched = make(budget=6)
    a = seq(10)
    sched.add(a)
    b1 = run_step(sched, bm)
    assert b1.num_scheduled_tokens == [6] and a.num_computed_tokens == 6
    b2 = run_step(sched, bm)
    assert b2.num_scheduled_tokens == [4] and a.num_output_tokens == 1
    b3 = run_step(sched, bm)
    assert b3.num_scheduled_tokens == [1]  # decode


def test_decodes_first_and_budget_shared():
    bm, sched = make(budget=8, num_blocks=32)
    a = seq(3, max_tokens=10)
    sched.add(a)
    run_step(sched, bm)  # a prefilled, now decoding
    b = seq(20, start=100)
    sched.add(b)
    batch = run_step(sched, bm)
    assert batch.seqs == [a, b] and batch.num_scheduled_tokens == [1, 7]


def test_max_num_seqs_limits_admission():
    bm, sched = make(max_num_seqs=2, num_blocks=64)
    for i in range(3):
        sched.add(seq(2, start=10 * i))
    batch = run_step(sched, bm)
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_preemption_and_resume():
    bm, sched = make(num_blocks=4, block_size=4, budget=64, max_num_seqs=4)
    a, b = seq(7, max_tokens=6), seq(7, start=50, max_tokens=6)
    sched.add(a)
    sched.add(b)
    run_step(sched, bm)  # both prefilled: 2 blocks each, all 4 used
    assert bm.num_free_blocks == 0
    run_step(sched, bm)  # token 8 still fits in 2 blocks
    run_step(sched, bm)  # a needs a 3rd block for token 9 -> b (newest) is preempted
    assert b.status == SequenceStatus.WAITING and b.num_preemptions == 1 and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    while sched.has_unfinished():
        run_step(sched, bm)
    assert a.finish_reason == b.finish_reason == "length"
    assert a.num_output_tokens == b.num_output_tokens == 6
    assert bm.num_free_blocks == 4


def test_prefix_cache_hit_and_no_hit_for_last_token():
    bm, sched = make(num_blocks=16, block_size=4)
    a = seq(10, max_tokens=1)
    sched.add(a)
    while sched.has_unfinished():
        run_step(sched, bm)
    b = Sequence(list(range(10)) + [99, 98], SamplingParams(max_tokens=1))
    sched.add(b)
    batch = run_step(sched, bm)
    assert b.num_cached_tokens == 8  # two full blocks shared
    assert batch.num_scheduled_tokens == [4]
    c = Sequence(list(range(8)), SamplingParams(max_tokens=1))  # fully cached prompt: last token recomputed
    sched.add(c)
    run_step(sched, bm)
    assert c.num_cached_tokens == 4


def test_prefix_blocks_are_shared_by_ref_count():
    bm, sched = make(num_blocks=16, block_size=4)
    a = seq(9, max_tokens=3)
    sched.add(a)
    run_step(sched, bm)
    b = seq(9, max_tokens=3)
    sched.add(b)
    run_step(sched, bm)
    assert a.block_table[:2] == b.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_abort_frees_waiting_and_running():
    bm, sched = make(num_blocks=8, max_num_seqs=1)
    a, b = seq(6, max_tokens=50), seq(6, start=20, max_tokens=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, bm)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_unfinished() and bm.num_free_blocks == 8


def check_sliding_tables(batch, window=6, bs=4):
    """Scheduled: each sliding table holds exactly the blocks from the first one the window reaches to the end."""
    for s in batch.seqs:
        full, sliding = s.block_tables
        first = max(0, s.num_computed_tokens - window + 1) // bs
        assert -1 not in full and len(full) == len(sliding)
        assert all(b == -1 for b in sliding[:first]) and -1 not in sliding[first:]


def test_blocks_without_a_hash_are_reused_first():
    """Prefix caching off: the next request takes the blocks the last one freed (their pages are resident). On: a
    partly filled block goes before the full, cached ones, which stay findable."""
    bm, sched = make(num_blocks=16, block_size=4, prefix=False)
    a = seq(10, max_tokens=2)
    sched.add(a)
    run_step(sched, bm)
    used = set(a.block_table)
    run_step(sched, bm)  # decode and finish
    assert a.is_finished
    b = seq(9, start=50, max_tokens=2)
    sched.add(b)
    run_step(sched, bm)
    assert set(b.block_table) == used
    bm, sched = make(num_blocks=16, block_size=4)
    a = seq(10, max_tokens=2)
    sched.add(a)
    run_step(sched, bm)
    full, partial = a.block_table[:2], a.block_table[2]
    run_step(sched, bm)
    assert a.is_finished
    c = seq(3, start=50)
    sched.add(c)
    run_step(sched, bm)
    assert c.block_table == [partial]
    assert bm.allocate_prefix(seq(10)) == 8 and all(bm.blocks[i].ref_count == 1 for i in full)


def test_sliding_group_gives_back_blocks_out_of_its_window():
    bm, sched = make(num_blocks=32, block_size=4, budget=8, windows=(None, 6))
    a = seq(30, max_tokens=20)
    sched.add(a)
    most = 0
    while sched.has_unfinished():
        run_step(sched, bm, check=check_sliding_tables)
        if not a.is_finished:
            most = max(most, sum(b != -1 for b in a.block_tables[1]))
            # 12 full blocks at the end; the sliding group: 5 keys back + up to 8 new tokens -> at most 4 blocks
            assert bm.num_free_blocks >= 32 - len(a.block_tables[0]) - 4
    assert most == 4 and bm.num_free_blocks == 32


def test_prefix_hit_needs_the_sliding_window_blocks():
    bm, sched = make(num_blocks=32, block_size=4, budget=8, windows=(None, 6))
    a = seq(20, max_tokens=1)
    sched.add(a)
    while sched.has_unfinished():
        run_step(sched, bm)
    b = seq(21)
    assert bm.allocate_prefix(b) == 20  # full group: blocks 0-4; sliding group: blocks 3-4 (the window before 20)
    assert b.block_tables[1][:3] == [-1, -1, -1] and -1 not in b.block_tables[1][3:]
    bm.free(b)
    # the sliding group's block 4 is gone from the cache: the longest usable hit is 4 blocks (window before 16: 2-3)
    block_hash = -1
    for i in range(5):
        block_hash = compute_hash(list(range(4 * i, 4 * i + 4)), block_hash)
    del bm.hash_to_block_id[(1, block_hash)]
    c = seq(21)
    assert bm.allocate_prefix(c) == 16
    assert c.block_tables[1][:2] == [-1, -1] and len(c.block_tables[0]) == 4
    bm.free(c)
    assert bm.num_free_blocks == 32


def test_shortest_policy_admits_short_prompts_first_and_ages_long_ones():
    bm, sched = make(num_blocks=64, max_num_seqs=8, budget=8)
    sched.policy = "shortest"
    long = seq(40, start=500)
    sched.add(long)
    sched.add(seq(3, start=100))
    batch = run_step(sched, bm)
    assert batch.seqs[0].num_prompt_tokens == 3  # the short one first, then the long one takes the rest
    assert batch.num_scheduled_tokens == [3, 5]
    # a stream of short prompts does not hold back a long one for more than a few steps: credit 2 tokens per step
    bm, sched = make(num_blocks=256, max_num_seqs=64, budget=8)
    sched.policy = "shortest"
    long = seq(40, start=500, max_tokens=1)
    sched.add(long)
    for step in range(40):
        sched.add(seq(8, start=1000 + 10 * step, max_tokens=1))
        run_step(sched, bm)
        if long.num_computed_tokens:
            break
    assert 0 < step <= (40 - 8) // 2 + 1


@pytest.mark.parametrize("policy", ["fcfs", "shortest"])
@pytest.mark.parametrize("windows", [(None,), (None, 6)])
def test_random_workload_leaks_nothing_and_nobody_starves(windows, policy):
    rng = random.Random(0)
    bm, sched = make(num_blocks=40, block_size=4, max_num_seqs=6, budget=24, windows=windows)
    sched.policy = policy
    check = check_sliding_tables if len(windows) > 1 else lambda batch: None

    seqs = []
    shared = [rng.randrange(1000) for _ in range(12)]
    steps = 0
    while len(seqs) < 500 or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if len(seqs) < 500:
                prompt = (shared[: rng.randint(0, 12)] if rng.random() < 0.5 else []) + [
                    rng.randrange(1000) for _ in range(rng.randint(1, 30))
                ]
                s = Sequence(prompt, SamplingParams(max_tokens=rng.randint(1, 12)))
                seqs.append(s)
                sched.add(s)
        if sched.running and rng.random() < 0.05:
            sched.finish(rng.choice(sched.running), "abort")
        run_step(sched, bm, next_token=lambda s: rng.randrange(1000), check=check)
        steps += 1
        assert steps < 20000, "the workload does not drain"
    assert all(s.is_finished for s in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert sum(s.num_cached_tokens > 0 for s in seqs) > 50  # the shared prefix was hit


def step_with(sched: Scheduler, token_id: int, logprob=None):
    batch = sched.schedule()
    sampled = [s for s, n in zip(batch.seqs, batch.num_scheduled_tokens) if s.num_computed_tokens + n == s.num_tokens]
    sched.postprocess(batch, sampled, [token_id] * len(sampled), [logprob] * len(sampled))
    return batch, sampled


def test_postprocess_advances_chunks_and_samples_only_finished_prompts():
    bm, sched = make(budget=6, num_blocks=16)
    a = seq(10, max_tokens=5)
    sched.add(a)
    batch, sampled = step_with(sched, 42)
    assert batch.num_scheduled_tokens == [6] and sampled == [] and a.num_computed_tokens == 6
    assert len(a.block_hashes) == 1  # the first full block went into the prefix cache
    _, sampled = step_with(sched, 42, logprob="lp")
    assert sampled == [a] and a.token_ids[-1] == 42 and a.logprobs == ["lp"] and a.num_computed_tokens == 10
    assert len(a.block_hashes) == 2 and not a.is_finished


@pytest.mark.parametrize(
    ("params", "eos", "token", "reason"),
    [
        (SamplingParams(max_tokens=9, stop_token_ids=[5]), set(), 5, "stop"),
        (SamplingParams(max_tokens=9), {2}, 2, "stop"),
        (SamplingParams(max_tokens=9, ignore_eos=True), {2}, 2, None),  # eos ignored
        (SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=[2]), {2}, 2, "stop"),  # stop ids still count
        (SamplingParams(max_tokens=1), {2}, 3, "length"),
        (SamplingParams(max_tokens=9), set(), 3, None),
    ],
)
def test_postprocess_finishes_on_stop_tokens_and_max_tokens(params, eos, token, reason):
    bm, sched = make(eos_token_ids=eos)
    a = Sequence([10, 11, 12], params)
    sched.add(a)
    step_with(sched, token)
    assert a.finish_reason == reason and a.is_finished == (reason is not None)
    assert (bm.num_free_blocks == bm.num_blocks) == (reason is not None)  # a finished sequence's blocks are freed
    assert (a in sched.running) == (reason is None)


def test_postprocess_finishes_at_the_context_end():
    bm, sched = make(max_model_len=6)
    a = Sequence([10, 11, 12, 13], SamplingParams(max_tokens=100))
    sched.add(a)
    step_with(sched, 3)
    assert not a.is_finished
    step_with(sched, 3)
    assert a.num_tokens == 6 and a.finish_reason == "length" and bm.num_free_blocks == bm.num_blocks


def test_finish_twice_only_changes_the_reason():
    bm, sched = make()
    a = seq(6)
    sched.add(a)
    step_with(sched, 3)
    sched.finish(a, "length")
    sched.finish(a, "stop")
    assert a.finish_reason == "stop" and bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()


def test_the_scheduler_owns_a_block_manager_built_from_the_config():
    config = EngineConfig(block_size=8, enable_prefix_caching=False, max_num_seqs=3, max_num_batched_tokens=40,
                          scheduling_policy="shortest")  # fmt: skip
    sched = Scheduler(config, 12, (None, 16))
    bm = sched.block_manager
    assert (bm.num_blocks, bm.block_size, bm.enable_prefix_caching, bm.windows) == (12, 8, False, (None, 16))
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.policy) == (3, 40, "shortest")
