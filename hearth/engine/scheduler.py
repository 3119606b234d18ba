"""Scheduler: decides which sequences run each step and how many of their tokens (vLLM's iteration-level model).

Each step has a token budget (`max_num_batched_tokens`). Running decodes are served first, one token each; then
running sequences still in (chunked) prefill; then waiting sequences, in arrival order or (policy "shortest") fewest
prompt tokens first, while the budget and `max_num_seqs` allow. When the cache runs out of blocks the most recently
admitted running sequence is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed (its prefix may still be cached).

The scheduler owns the block manager: it reserves cache slots when it schedules, and after the runner's step
`postprocess` advances each sequence, registers the blocks that became full and finishes the sequences that sampled a
stop token or reached their length limit (freeing their blocks). Stop strings need the text: the engine finishes those.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hearth.config import SCHEDULING_POLICIES, EngineConfig
from hearth.engine.block_manager import BlockManager
from hearth.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class Batch:
    """The scheduler's output: data only, so the runner could live elsewhere."""

    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, windows: tuple[int | None, ...] = (None,),
                 max_model_len: int | None = None, eos_token_ids: set[int] | frozenset[int] = frozenset()):  # fmt: skip
        """`num_blocks` KV blocks of `config.block_size` tokens, one table per KV group (`windows`, as BlockManager);
        a sequence finishes at `max_model_len` tokens and on any of `eos_token_ids` (unless its params ignore eos)."""
        if config.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {config.scheduling_policy!r}")  # fmt: skip
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, windows,
                                          hit_needs_next_token=config.speculative == "mtp")  # fmt: skip
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.policy = config.scheduling_policy
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.num_draft_tokens = 0  # speculative decoding: drafts scored, and those kept, since the start
        self.num_accepted_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.arrival_step = self.num_steps
        self.waiting.append(seq)

    def _next_waiting(self) -> Sequence:
        """fcfs: the oldest. shortest: the one with the fewest tokens left to prefill, where each step spent waiting
        counts as a quarter of the step's token budget, so a long prompt waits at most a few steps behind shorter
        ones (max_model_len / (budget / 4) steps) and cannot starve. Preempted sequences always go first."""
        if self.policy == "fcfs":
            return self.waiting[0]
        credit = self.max_num_batched_tokens / 4

        def key(seq: Sequence) -> tuple:
            left = seq.num_tokens - seq.num_computed_tokens
            return (seq.num_preemptions == 0, left - credit * (self.num_steps - seq.arrival_step))

        return min(self.waiting, key=key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prefill_work(self) -> bool:
        """More than one token of some sequence waits to be computed: the next step will prefill (a long step on
        CPU). A prompt with only its last token left is prefill too, but a short step: it does not count here."""
        return bool(self.waiting) or any(s.num_tokens - s.num_computed_tokens > 1 for s in self.running)

    @staticmethod
    def _keep_drafts(seq: Sequence, n: int) -> None:
        if n < len(seq.spec_tokens):
            del seq.spec_tokens[n:]
            if seq.spec_probs is not None:
                seq.spec_probs = seq.spec_probs[:n] if n else None

    def _preempt(self, seq: Sequence) -> None:
        self._keep_drafts(seq, 0)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> Batch:
        """Pick this step's sequences and token counts, reserving their cache slots."""
        batch = Batch()
        budget = self.max_num_batched_tokens
        # running sequences: decodes (one token left to compute) before unfinished prefills
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq not in self.running:  # preempted below to make room for an earlier one
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.spec_tokens:  # a decode with drafts: score them too, as far as the budget and the cache allow
                num_new = min(1 + len(seq.spec_tokens), budget)
                if not self.block_manager.can_append(seq, num_new):
                    num_new = 1
                self._keep_drafts(seq, num_new - 1)
            while not self.block_manager.can_append(seq, num_new):
                # preempt the newest sequence not already in this batch, or this one if there is none
                victim = next((s for s in reversed(self.running) if s is not seq and s not in batch.seqs), seq)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.append_slots(seq, num_new)
            batch.seqs.append(seq)
            batch.num_scheduled_tokens.append(num_new)
            budget -= num_new
        # waiting sequences, in the policy's order
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if not any(seq.block_tables):
                cached = self.block_manager.allocate_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = cached
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.can_append(seq, num_new):
                if not self.running and not batch.seqs:
                    # nothing else holds blocks: shrink the chunk to what fits
                    num_new = self.block_manager.max_appendable(seq, num_new)
                if num_new == 0 or not self.block_manager.can_append(seq, num_new):
                    self.block_manager.free(seq)  # let go of prefix blocks held while waiting
                    break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.append_slots(seq, num_new)
            batch.seqs.append(seq)
            batch.num_scheduled_tokens.append(num_new)
            budget -= num_new
        self.num_steps += 1
        return batch

    def postprocess(self, batch: Batch, sampled: list[Sequence], token_ids: list[int],
                    logprobs: list) -> None:  # fmt: skip
        """After the runner computed `batch`: each sequence has its scheduled tokens in the cache (the blocks that
        became full go into the prefix cache); `sampled` (those whose every token is now computed) get their new token
        and logprob (and their grammar, if any, advances), and finish on a stop token or a completed grammar ("stop"), or
        at max_tokens or the context's end ("length").

        A sequence that verified draft tokens gets a list of tokens (and a list of logprobs): the drafts it kept and
        the one that follows them; only the kept drafts' KV stays in the cache."""
        verified = {s.seq_id: ids for s, ids in zip(sampled, token_ids) if isinstance(ids, list)}
        for seq, num_new in zip(batch.seqs, batch.num_scheduled_tokens):
            start = seq.num_computed_tokens
            if seq.spec_tokens:
                # a verification: the last token and the kept drafts have their KV in the cache; the slots of the
                # rejected ones are given back and will be overwritten
                emitted = verified[seq.seq_id]
                drafted, kept = len(seq.spec_tokens), len(emitted) - 1
                seq.spec_last = (drafted, kept)
                seq.num_draft_tokens += drafted
                seq.num_accepted_tokens += kept
                self.num_draft_tokens += drafted
                self.num_accepted_tokens += kept
                self._keep_drafts(seq, 0)
                num_new = 1 + kept
                seq.token_ids.extend(emitted[:kept])  # for commit's hashes; taken off again below
            seq.num_computed_tokens = start + num_new
            self.block_manager.commit(seq, start)
            if seq.seq_id in verified:
                self.block_manager.trim(seq)
                del seq.token_ids[len(seq.token_ids) - (len(verified[seq.seq_id]) - 1) :]
        for seq, token_id, lp in zip(sampled, token_ids, logprobs):
            if not isinstance(token_id, list):
                self._append(seq, token_id, lp)
                continue
            # several tokens: each is checked as if it came alone; what follows a finishing one is dropped, in place,
            # so that the caller sees only what the sequence emitted
            for i, (tid, tlp) in enumerate(zip(token_id, lp)):
                self._append(seq, tid, tlp)
                if seq.is_finished:
                    del token_id[i + 1 :], lp[i + 1 :]
                    break

    def _append(self, seq: Sequence, token_id: int, lp) -> None:
        seq.append_token(token_id)
        if lp is not None:
            seq.logprobs.append(lp)
        params = seq.params
        stop_token = token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos)
        # a grammar advances with every other token; once complete it ends the sequence as a stop token does
        if stop_token or (seq.grammar is not None and seq.grammar.accept(seq, token_id)):
            self.finish(seq, "stop")
        elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
            self.max_model_len is not None and seq.num_tokens >= self.max_model_len
        ):
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished (or aborted) and free its blocks; works for waiting and running sequences, and on a
        finished one only sets the reason (its blocks are already free)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
