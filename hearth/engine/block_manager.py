"""Paged KV-cache blocks: a free list, reference counts and a hash-based prefix cache. Pure Python, no torch.

A full block is identified by the hash of (previous block's hash, its token ids), so a block can be shared by every
sequence whose prompt starts with the same tokens. Freed blocks keep their hash until reused, so a later request with
the same prefix finds them again (LRU order: the least recently freed block is reused first).
"""

from __future__ import annotations

from collections import OrderedDict

from hearth.engine.sequence import Sequence


def compute_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    return hash((prefix_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, (), 1
        return block_id

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching the start of `seq` (never its last token); return the tokens covered."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        prefix_hash = -1
        max_full = (seq.num_tokens - 1) // self.block_size
        for i in range(max_full):
            ids = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            prefix_hash = compute_hash(ids, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(ids):
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        num_cached = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = num_cached
        return num_cached

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room in `seq`'s block table for its next `num_new_tokens` tokens."""
        for _ in range(self._blocks_needed(seq, seq.num_computed_tokens + num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full in the last step in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = num_computed_before // bs, seq.num_computed_tokens // bs
        prefix_hash = self.blocks[seq.block_table[first - 1]].hash if first > 0 else -1
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            ids = seq.token_ids[i * bs : (i + 1) * bs]
            prefix_hash = compute_hash(ids, prefix_hash)
            if block.hash == -1:
                block.hash, block.token_ids = prefix_hash, tuple(ids)
                self.hash_to_block_id.setdefault(prefix_hash, block.block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
