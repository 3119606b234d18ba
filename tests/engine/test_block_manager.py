"""BlockManager on its own (pure Python, no model): allocation and freeing, reference counts, the hash-chained prefix
cache, reuse order, sliding-window groups, and generated operation sequences that must never leak or double-free."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import NULL_BLOCK, BlockManager, compute_hash
from hearth.engine.sequence import Sequence
from hearth.sampling_params import SamplingParams


def seq(ids) -> Sequence:
    return Sequence(list(ids), SamplingParams())


def compute(bm: BlockManager, s: Sequence, num_new: int) -> None:
    """What a step does to the cache: reserve slots for `num_new` tokens, compute them, commit the full blocks."""
    assert bm.can_append(s, num_new)
    bm.append_slots(s, num_new)
    before = s.num_computed_tokens
    s.num_computed_tokens += num_new
    bm.commit(s, before)


def test_append_slots_takes_whole_blocks_and_free_returns_them():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    bm.append_slots(s, 10)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    s.num_computed_tokens = 10
    bm.append_slots(s, 2)  # tokens 10, 11 still fit the third block
    assert len(s.block_table) == 3
    bm.append_slots(s, 3)  # token 12 opens a fourth
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(s)
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_can_append_and_max_appendable_count_the_free_blocks():
    bm = BlockManager(3, 4)
    s = seq(range(20))
    assert bm.can_append(s, 12) and not bm.can_append(s, 13)
    assert bm.max_appendable(s, 20) == 12
    assert bm.max_appendable(s, 5) == 5  # never more than asked
    other = seq(range(100, 104))
    bm.append_slots(other, 4)
    assert bm.max_appendable(s, 20) == 8


def test_compute_hash_chains_on_the_previous_block():
    a = compute_hash([1, 2, 3, 4])
    assert a == compute_hash([1, 2, 3, 4], -1)
    assert compute_hash([5, 6, 7, 8], a) != compute_hash([5, 6, 7, 8])  # same tokens after another prefix
    assert compute_hash([5, 6, 7, 8], a) == compute_hash([5, 6, 7, 8], compute_hash([1, 2, 3, 4]))


def test_commit_registers_full_blocks_and_a_second_sequence_shares_them():
    bm = BlockManager(16, 4)
    a = seq(range(10))
    compute(bm, a, 10)
    assert len(a.block_hashes) == 2  # two full blocks; the third holds 2 tokens and has no hash
    assert [bm.blocks[b].hash for b in a.block_table] == [*a.block_hashes, -1]
    b = seq([*range(8), 50, 51, 52])
    assert bm.allocate_prefix(b) == 8 and b.num_computed_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]  # still held by b
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_a_prefix_hit_never_covers_the_last_prompt_token():
    bm = BlockManager(16, 4)
    a = seq(range(8))
    compute(bm, a, 8)
    bm.free(a)
    b = seq(range(8))  # the same 8 tokens: two cached blocks, but the last token must be computed to sample
    assert bm.allocate_prefix(b) == 4 and len(b.block_table) == 1


def test_a_hash_entry_for_other_tokens_is_no_hit():
    bm = BlockManager(16, 4)
    a = seq(range(8))
    compute(bm, a, 8)
    # point the hash of another first block at a's block: the tokens differ, so it must not be used
    other = [9, 9, 9, 9]
    bm.hash_to_block_id[(0, compute_hash(other))] = a.block_table[0]
    b = seq([*other, 1, 2])
    assert bm.allocate_prefix(b) == 0 and b.block_table == []


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    bm = BlockManager(4, 4)
    a = seq(range(8))
    compute(bm, a, 8)
    cached = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    # blocks without a hash go first: the next 8 tokens take the two blocks a never used
    b = seq(range(100, 108))
    bm.append_slots(b, 8)
    assert not set(b.block_table) & set(cached)
    assert bm.allocate_prefix(seq(range(9))) == 8  # a's blocks are still found
    bm.free(b)


def test_reusing_a_cached_block_forgets_its_hash():
    bm = BlockManager(2, 4)
    a = seq(range(4))
    compute(bm, a, 4)
    bm.free(a)
    b = seq(range(100, 108))
    bm.append_slots(b, 8)  # needs both blocks: the cached one is taken and loses its hash
    assert not bm.hash_to_block_id and all(block.hash == -1 for block in bm.blocks)
    bm.free(b)
    assert bm.allocate_prefix(seq(range(5))) == 0


def test_prefix_caching_off_registers_and_finds_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = seq(range(10))
    compute(bm, a, 10)
    assert not bm.hash_to_block_id and a.block_hashes == []
    bm.free(a)
    assert bm.allocate_prefix(seq(range(10))) == 0


def test_a_sliding_group_gives_back_blocks_its_window_no_longer_reaches():
    bm = BlockManager(32, 4, windows=(None, 6))
    s = seq(range(30))
    for _ in range(6):
        compute(bm, s, 5)
    full, sliding = s.block_tables
    assert NULL_BLOCK not in full and len(full) == 8
    # the next token (position 30) reads keys 25..30: blocks 6 and 7 only
    bm.drop_out_of_window(s)
    assert sliding[:6] == [NULL_BLOCK] * 6 and NULL_BLOCK not in sliding[6:]
    assert bm.num_free_blocks == 32 - 8 - 2
    bm.free(s)
    assert bm.num_free_blocks == 32


ops = st.lists(st.tuples(st.sampled_from(["new", "compute", "free"]), st.integers(0, 7), st.integers(1, 9)),
               max_size=60)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(ops=ops, windows=st.sampled_from([(None,), (None, 6)]), prefix=st.booleans())
def test_generated_operations_keep_ref_counts_and_the_free_list_exact(ops, windows, prefix):
    bm = BlockManager(24, 4, prefix, windows)
    live: list[Sequence] = []
    shared = list(range(12))
    for op, pick, n in ops:
        if op == "new":
            s = seq(shared[: n + 3] + [1000 + pick] * n)  # prompts that share a prefix, so the cache gets hits
            bm.allocate_prefix(s)
            live.append(s)
        elif op == "compute" and live:
            s = live[pick % len(live)]
            num_new = min(n, s.num_tokens - s.num_computed_tokens)
            if num_new == 0:
                s.append_token(n)
                num_new = 1
            if bm.can_append(s, num_new):
                compute(bm, s, num_new)
        elif op == "free" and live:
            bm.free(live.pop(pick % len(live)))
        held: dict[int, int] = {}
        for s in live:
            for table in s.block_tables:
                for b in table:
                    if b != NULL_BLOCK:
                        held[b] = held.get(b, 0) + 1
        assert {b.block_id: b.ref_count for b in bm.blocks if b.ref_count} == held
        assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        for (group, h), block_id in bm.hash_to_block_id.items():  # every cache entry names a block with that hash
            assert (bm.blocks[block_id].group, bm.blocks[block_id].hash) == (group, h)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks


def test_a_hit_that_needs_the_next_token_stops_at_a_block_that_went_on_differently():
    """With hit_needs_next_token (DeepSeek's MTP proposer), a cached block counts only when the token recorded after
    it is the new sequence's next token; a block with none recorded (its rows never written) is not a hit either."""
    bm = BlockManager(16, 4, hit_needs_next_token=True)
    first = seq(list(range(12)) + [50, 51])
    compute(bm, first, 14)  # blocks 0..2 full
    for b, table_id in enumerate(first.block_table[:3]):
        if b < 2:  # the proposer wrote the rows of blocks 0 and 1, and recorded the token after each
            bm.blocks[table_id].next_token = first.token_ids[(b + 1) * 4]
    bm.free(first)
    same = seq(list(range(12)) + [50, 60])
    assert bm.allocate_prefix(same) == 8  # block 2 has no recorded token: computed again
    bm.free(same)
    other = seq(list(range(8)) + [99] + list(range(9, 14)))
    assert bm.allocate_prefix(other) == 4  # block 1 was followed by token 8, not 99
    bm.free(other)
    plain = BlockManager(16, 4)
    s = seq(list(range(12)) + [50, 51])
    compute(plain, s, 14)
    plain.free(s)
    assert plain.allocate_prefix(seq(list(range(12)) + [50, 60])) == 12  # without the flag: every full block
