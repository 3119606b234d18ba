"""Paged KV-cache blocks: a free list, reference counts and a hash-based prefix cache. Pure Python, no torch.

A full block is identified by the hash of (previous block's hash, its token ids), so a block can be shared by every
sequence whose prompt starts with the same tokens. Freed blocks keep their hash until reused, so a later request with
the same prefix finds them again (LRU order: the least recently freed block is reused first). Freed blocks without
a hash (partly filled, or prefix caching off) are reused before any cached one, which also keeps the cache's
resident pages few.

KV groups (KVSpec.groups): a model whose layers differ in window (gpt-oss: sliding 128 / full) has one block table per
group and sequence, all drawing on one pool. A sliding group only keeps the blocks its window still reaches: older
ones go back to the pool (their table entry becomes -1), so its layers hold about `window` tokens per sequence.
A prefix-cache hit then needs the full groups' blocks from the start and the sliding groups' blocks for the last
window before the hit's end (vLLM's hybrid KV-cache manager does the same).
"""

from __future__ import annotations

from collections import OrderedDict

from hearth.engine.sequence import Sequence

NULL_BLOCK = -1  # a sliding group's table entry for a block it gave back


def compute_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    return hash((prefix_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "group", "token_ids", "next_token")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.group = 0
        self.token_ids: tuple[int, ...] = ()
        # the token after the block that state derived from its last position was computed with (-1: none yet); set
        # by DeepSeek's MTP proposer, whose row there reads that token (see BlockManager's `hit_needs_next_token`)
        self.next_token = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: tuple[int | None, ...] = (None,), hit_needs_next_token: bool = False):  # fmt: skip
        """`hit_needs_next_token`: a cached block is a prefix hit only if its `next_token` is the sequence's token
        after it (DeepSeek's MTP layer keeps, at a block's last position, a row that read the next token: a block
        from a sequence that went on differently, or whose rows were never written, is computed again)."""
        self.hit_needs_next_token = hit_needs_next_token
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[tuple[int, int], int] = {}  # (group, chain hash) -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)  # per KV group: None (full attention) or its sliding window

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _tables(self, seq: Sequence) -> list[list[int]]:
        while len(seq.block_tables) < len(self.windows):
            seq.block_tables.append([])
        return seq.block_tables

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        key = (block.group, block.hash)
        if block.hash != -1 and self.hash_to_block_id.get(key) == block_id:
            del self.hash_to_block_id[key]
        block.hash, block.token_ids, block.ref_count, block.next_token = -1, (), 1, -1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash == -1:  # nothing cached in it: reuse it first, its pages are already resident
                self.free_block_ids.move_to_end(block_id, last=False)

    def _first_needed_block(self, window: int | None, num_computed: int) -> int:
        """The oldest block a group still reads when the next token to compute is at position `num_computed`."""
        if window is None:
            return 0
        return max(0, num_computed - window + 1) // self.block_size

    def drop_out_of_window(self, seq: Sequence) -> None:
        """Give back the sliding groups' blocks that no future query of `seq` can reach."""
        for window, table in zip(self.windows, self._tables(seq)):
            if window is None:
                continue
            for i in range(self._first_needed_block(window, seq.num_computed_tokens) - 1, -1, -1):
                if table[i] == NULL_BLOCK:
                    break  # dropped earlier, and everything before it too
                self._release(table[i])
                table[i] = NULL_BLOCK

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        logical = -(-num_tokens // self.block_size)
        return sum(max(0, logical - len(table)) for table in self._tables(seq))

    def _cached_block(self, group: int, block_hash: int, ids: list[int]) -> int | None:
        block_id = self.hash_to_block_id.get((group, block_hash))
        if block_id is None or self.blocks[block_id].token_ids != tuple(ids):
            return None
        return block_id

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching the start of `seq` (never its last token); return the tokens covered."""
        tables = self._tables(seq)
        assert not any(tables)
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_full = (seq.num_tokens - 1) // bs
        hashes, chunks, prefix_hash = [], [], -1
        for i in range(max_full):
            ids = seq.token_ids[i * bs : (i + 1) * bs]
            prefix_hash = compute_hash(ids, prefix_hash)
            hashes.append(prefix_hash)
            chunks.append(ids)
        # the full groups bound the hit: their blocks must all be cached from the start
        n = max_full
        for g, window in enumerate(self.windows):
            if window is None:
                k = 0
                while k < n and (block_id := self._cached_block(g, hashes[k], chunks[k])) is not None:
                    if self.hit_needs_next_token and self.blocks[block_id].next_token != seq.token_ids[(k + 1) * bs]:
                        break
                    k += 1
                n = k
        # then the longest n for which each sliding group has the blocks its window reaches back to
        while n > 0 and not all(
            self._cached_block(g, hashes[i], chunks[i]) is not None
            for g, window in enumerate(self.windows) if window is not None
            for i in range(self._first_needed_block(window, n * bs), n)
        ):  # fmt: skip
            n -= 1
        for g, (window, table) in enumerate(zip(self.windows, tables)):
            first = self._first_needed_block(window, n * bs)
            table.extend([NULL_BLOCK] * first)
            for i in range(first, n):
                block_id = self._cached_block(g, hashes[i], chunks[i])
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_block_ids[block_id]
                block.ref_count += 1
                table.append(block_id)
        seq.block_hashes = hashes[:n]
        seq.num_computed_tokens = n * bs
        return n * bs

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        self.drop_out_of_window(seq)
        return self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens) <= self.num_free_blocks

    def max_appendable(self, seq: Sequence, limit: int) -> int:
        """The most new tokens (≤ limit) `seq` could get cache room for right now."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.can_append(seq, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room in `seq`'s block tables for its next `num_new_tokens` tokens."""
        self.drop_out_of_window(seq)
        logical = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        for table in self._tables(seq):
            for _ in range(logical - len(table)):
                table.append(self._take_free_block())

    def commit(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full in the last step in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        last = seq.num_computed_tokens // bs
        first = min(num_computed_before // bs, len(seq.block_hashes))
        prefix_hash = seq.block_hashes[first - 1] if first > 0 else -1
        del seq.block_hashes[first:]
        for i in range(first, last):
            ids = seq.token_ids[i * bs : (i + 1) * bs]
            prefix_hash = compute_hash(ids, prefix_hash)
            seq.block_hashes.append(prefix_hash)
            for g, table in enumerate(self._tables(seq)):
                if table[i] == NULL_BLOCK:
                    continue
                block = self.blocks[table[i]]
                if block.hash == -1:
                    block.hash, block.group, block.token_ids = prefix_hash, g, tuple(ids)
                    self.hash_to_block_id.setdefault((g, prefix_hash), block.block_id)

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past `seq.num_computed_tokens`: slots reserved for draft tokens that were rejected.
        They were never registered in the prefix cache (commit only hashes blocks the computed tokens fill)."""
        logical = -(-seq.num_computed_tokens // self.block_size)
        for table in self._tables(seq):
            while len(table) > logical:
                block_id = table.pop()
                if block_id != NULL_BLOCK:
                    self._release(block_id)

    def free(self, seq: Sequence) -> None:
        for table in self._tables(seq):
            for block_id in reversed(table):
                if block_id != NULL_BLOCK:
                    self._release(block_id)
            table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
