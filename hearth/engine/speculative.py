"""Speculative decoding: proposers guess a few tokens per decoding sequence, the target model scores them in the step.

Before each step the Speculator asks its proposer for up to k draft tokens for each running sequence that decodes;
the scheduler schedules a sequence with k drafts as a chunk of 1 + k tokens on its paged cache (its last token and the
drafts), the model runner returns logits for every one of those rows and verifies them (layers/rejection_sampler.py),
and the scheduler commits the kept tokens and gives back the cache slots of the rejected ones. docs/speculative.md
describes the whole path.

Proposers:
- NgramProposer (prompt lookup): the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
  are looked up earlier in its own prompt and output; the tokens that followed the latest match are the drafts. No
  model, nearly free: it pays off when the answer repeats its input (edits, rewrites, extraction, code).
- DraftModelProposer: a smaller model with the same tokenizer runs k decode steps of its own on its own paged cache.
- MtpProposer: DeepSeek-V3/R1's multi-token-prediction layer, part of the target model, guesses the next token from
  the target's last hidden state and the token just sampled; further drafts chain the layer on its own output.

Before anything is proposed, each step, `retain(running)` lets the proposer bring what it keeps in line with the
running sequences: it drops what it kept for the others (and the MTP proposer runs its layer over the rows the target
computed in the last step, drafted for or not, so that the layer's cache holds every computed position).

Adaptive k: each sequence starts at num_speculative_tokens; a verification that keeps every draft raises its k by one,
one that rejects some sets it to the number kept plus one, and three verifications in a row that keep nothing turn
speculation off for that sequence for a number of steps (doubling each time, up to 64). Speculation is off for the
whole step when more than `speculative_max_batch` sequences decode: a large batch already reads each weight once for
many tokens, and verifying drafts then costs more compute than it saves.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from hearth.config import EngineConfig
from hearth.engine.sequence import Sequence

logger = logging.getLogger(__name__)

MISSES_BEFORE_PAUSE = 3  # verifications in a row that keep nothing before a sequence pauses speculation
PAUSE_STEPS = (8, 64)  # its first pause, and the longest (each pause doubles)


class NgramProposer:
    """Prompt lookup: drafts are what followed the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        return [(self.lookup(seq.token_ids, k), None) for seq, k in zip(seqs, ks)]

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        length = len(token_ids)
        if k <= 0 or length <= self.min_n:
            return []
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # every window of n tokens that starts before the suffix itself does
            windows = np.lib.stride_tricks.sliding_window_view(ids[: length - 1], n)
            hits = np.flatnonzero((windows == ids[length - n :]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start : start + k].tolist()
        return []

    def retain(self, seqs: list[Sequence]) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


class Speculator:
    """Sets each decoding sequence's drafts before the step and adapts its k to what it keeps."""

    def __init__(self, config: EngineConfig, proposer, max_model_len: int):
        self.proposer = proposer
        self.max_k = config.num_speculative_tokens
        self.max_batch = config.speculative_max_batch
        self.max_model_len = max_model_len

    def adapt(self, seq: Sequence) -> None:
        if seq.spec_k < 0:
            seq.spec_k = self.max_k
        if seq.spec_last is None:
            return
        drafted, kept = seq.spec_last
        seq.spec_last = None
        seq.spec_k = min(self.max_k, seq.spec_k + 1) if kept == drafted else max(1, kept + 1)
        if kept:
            seq.spec_misses = 0
            return
        seq.spec_misses += 1
        if seq.spec_misses >= MISSES_BEFORE_PAUSE:
            seq.spec_misses = 0
            seq.spec_skip = min(PAUSE_STEPS[1], PAUSE_STEPS[0] << seq.spec_pauses)
            seq.spec_pauses += 1

    def budget(self, seq: Sequence) -> int:
        """Drafts worth asking for: k, and no more than the tokens the sequence may still emit, less one (the token
        verification always adds)."""
        left = self.max_model_len - seq.num_tokens - 1
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(seq.spec_k, left))

    def propose(self, running: list[Sequence]) -> None:
        decoding = []
        for seq in running:
            seq.spec_tokens, seq.spec_probs = [], None
            if seq.num_tokens - seq.num_computed_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decoding.append(seq)
        self.proposer.retain(running)  # what a proposer keeps for sequences no longer running goes
        if not decoding or len(decoding) > self.max_batch:
            return
        seqs, ks = [], []
        for seq in decoding:
            if seq.grammar is not None:  # drafts would be verified without the grammar's mask: never drafted
                continue
            self.adapt(seq)
            if seq.spec_skip > 0:
                seq.spec_skip -= 1
                continue
            k = self.budget(seq)
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        if not seqs:
            return
        for seq, (tokens, probs) in zip(seqs, self.proposer.propose(seqs, ks)):
            seq.spec_tokens, seq.spec_probs = list(tokens), probs

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: the proposer lets go of whatever it keeps for it."""
        seq.spec_tokens, seq.spec_probs = [], None
        self.proposer.release(seq)


def build_speculator(config: EngineConfig, max_model_len: int, target=None) -> Speculator | None:
    """The Speculator `config` asks for, or None. `target`: the engine, for a draft model's checks."""
    if config.speculative is None:
        return None
    if config.speculative == "ngram":
        proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    elif config.speculative == "draft":
        proposer = DraftModelProposer(config, target)
    elif config.speculative == "mtp":
        proposer = MtpProposer(target)
    else:
        raise ValueError(f"unknown speculative method {config.speculative!r}")
    return Speculator(config, proposer, max_model_len)


class DraftModelProposer:
    """A smaller model with the target's tokenizer guesses k tokens by decoding k steps on its own paged cache.

    Each target sequence has a mirror sequence in the draft's cache. Before proposing, the mirror is brought in line
    with the sequence: tokens the target rejected are rolled back (their blocks given back), the tokens the draft has
    not seen (the target's corrected or bonus token, or the whole prompt the first time) are computed, then the draft
    decodes k tokens, sampled with the sequence's own parameters; their processed distributions are the q of the
    verification. A sequence whose mirror cannot get cache blocks gets no drafts this step."""

    def __init__(self, config: EngineConfig, target):
        import dataclasses

        from hearth.engine.block_manager import BlockManager
        from hearth.engine.model_runner import ModelRunner
        from hearth.loader.inspect import read_gguf_config, read_hf_config
        from hearth.loader.resolve import resolve_model
        from hearth.tokenizer import load_tokenizer

        ref = resolve_model(config.draft_model)
        if ref.format == "gguf":
            from hearth.loader.gguf import open_gguf

            model_config = read_gguf_config(open_gguf(ref.path))
        else:
            model_config = read_hf_config(ref.path)
        check_same_vocabulary(target.tokenizer, load_tokenizer(ref.path), target.model_config.vocab_size,
                              model_config.vocab_size, config.draft_model)  # fmt: skip
        draft_config = dataclasses.replace(config, speculative=None, draft_model=None, max_model_len=target.max_model_len,
                                           enable_prefix_caching=False, kv_cache_memory=None)  # fmt: skip
        self.runner = ModelRunner(ref, model_config, draft_config, str(target.runner.device))
        self.block_manager = BlockManager(self.runner.num_kvcache_blocks, draft_config.block_size, False,
                                          self.runner.kv_windows)  # fmt: skip
        self.mirrors: dict[int, Sequence] = {}

    def _mirror(self, seq: Sequence) -> Sequence:
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:
            mirror = self.mirrors[seq.seq_id] = Sequence(seq.token_ids[: seq.num_prompt_tokens], seq.params)
        # keep what both agree on, short of the last token (its logits give the first draft); the draft's own tokens
        # past that are rolled back
        common, limit = 0, min(mirror.num_computed_tokens, seq.num_tokens - 1)
        while common < limit and mirror.token_ids[common] == seq.token_ids[common]:
            common += 1
        if mirror.num_computed_tokens > common:
            mirror.num_computed_tokens = common
            self.block_manager.trim(mirror)
        mirror.token_ids = list(seq.token_ids)
        return mirror

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        from hearth.engine.scheduler import Batch
        from hearth.layers.rejection_sampler import process_row

        live = []  # (index, seq, mirror, k)
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            mirror = self._mirror(seq)
            catch_up = mirror.num_tokens - mirror.num_computed_tokens
            if not self.block_manager.can_append(mirror, catch_up + k - 1):
                self.release(seq)
                continue
            self.block_manager.append_slots(mirror, catch_up + k - 1)
            live.append((i, seq, mirror, k))
        results: list[tuple[list[int], list[torch.Tensor]]] = [([], []) for _ in seqs]
        for step in range(max((k for *_, k in live), default=0)):
            active = [entry for entry in live if entry[3] > step]
            batch = Batch([m for _, _, m, _ in active], [m.num_tokens - m.num_computed_tokens for _, _, m, _ in active])
            logits = self.runner.logits(batch).float()
            for row, (i, seq, mirror, _) in enumerate(active):
                mirror.num_computed_tokens = mirror.num_tokens
                processed = process_row(logits[row], mirror.token_ids, seq.num_prompt_tokens, seq.params)
                if seq.params.is_greedy:
                    token = int(processed.argmax())
                else:
                    token = int(torch.multinomial(processed, 1, generator=seq.generator or self.runner.sampler.generator))
                    results[i][1].append(processed)
                mirror.token_ids.append(token)
                results[i][0].append(token)
        return [(tokens, torch.stack(probs) if probs else None) for tokens, probs in results]

    def retain(self, seqs: list[Sequence]) -> None:
        keep = {seq.seq_id for seq in seqs}
        for seq_id in [s for s in self.mirrors if s not in keep]:
            self.block_manager.free(self.mirrors.pop(seq_id))

    def release(self, seq: Sequence) -> None:
        mirror = self.mirrors.pop(seq.seq_id, None)
        if mirror is not None:
            self.block_manager.free(mirror)


def check_same_vocabulary(target_tok, draft_tok, target_vocab: int, draft_vocab: int, name: str) -> None:
    """ValueError unless the draft's tokenizer maps every id to the same token as the target's (and the models' vocab
    sizes agree): a draft token id must mean the same text to the target."""
    if target_vocab != draft_vocab or target_tok.vocab_size != draft_tok.vocab_size:
        raise ValueError(f"draft model {name}: its vocabulary ({draft_vocab} ids, tokenizer {draft_tok.vocab_size}) "
                         f"differs from the target's ({target_vocab}, tokenizer {target_tok.vocab_size})")  # fmt: skip
    for i in range(target_tok.vocab_size):
        if target_tok.id_to_token(i) != draft_tok.id_to_token(i):
            raise ValueError(f"draft model {name}: token id {i} is {draft_tok.id_to_token(i)!r} in its tokenizer but "
                             f"{target_tok.id_to_token(i)!r} in the target's")  # fmt: skip


class MtpRows:
    """A sequence as DeepSeek's MTP layer reads it, for ModelRunner.prepare: row j is token j + 1 at position j, in the
    sequence's own cache slots (the MTP layer's latent cache is paged by the target's block tables), and the rows run
    from `start` to the sequence's last computed position."""

    __slots__ = ("token_ids", "num_computed_tokens", "num_prompt_tokens", "block_tables", "spec_tokens")

    def __init__(self, seq: Sequence, start: int, drafts: list[int] | None = None):
        """`drafts`: the proposer's own tokens after the sequence's, for a chained row at the last of them."""
        self.token_ids = seq.token_ids[1 : seq.num_computed_tokens + 1] + (drafts or [])
        self.num_computed_tokens = start
        self.num_prompt_tokens = seq.num_prompt_tokens - 1
        self.block_tables = seq.block_tables
        self.spec_tokens: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        return self.block_tables[0]


class MtpProposer:
    """DeepSeek-V3/R1's multi-token-prediction layer drafts from the target's own hidden states.

    The target's model runner keeps the final hidden states of the rows each sequence computed (`keep_hidden`). At
    the next step's `retain`, the MTP layer runs over those of them that are now part of the sequence (all of a
    prefill chunk or a decode, the last token and the kept drafts of a verification): row i reads hidden state i and
    token i + 1 and writes the MTP cache at position i, in the target's own slots, so that the cache is rolled back
    with the target's (rejected positions are recomputed before they are read) and preemption and prefix hits need
    nothing more. Its output at each sequence's last computed position is kept; `propose` turns it into logits
    (shared_head) and the draft: the argmax for greedy requests, else a draw from the processed distribution, which
    is then the verification's q. Further drafts, up to k, chain the layer on its own output."""

    def __init__(self, target):
        self.runner = target.runner
        self.runner.keep_hidden = True
        self.block_manager = target.scheduler.block_manager
        self.last: dict[int, tuple[int, torch.Tensor]] = {}  # seq_id -> (position, MTP output there)

    def retain(self, seqs: list[Sequence]) -> None:
        running = {seq.seq_id for seq in seqs}
        rows = self.runner.hidden_rows
        for kept in (rows, self.last):
            for seq_id in [s for s in kept if s not in running]:
                del kept[seq_id]
        views, counts, previous, owners = [], [], [], []
        for seq in seqs:
            entry = rows.pop(seq.seq_id, None)
            if entry is None:
                continue
            start, hidden = entry
            n = min(len(hidden), seq.num_computed_tokens - start)  # a verification's rejected rows are left out
            if n > 0:
                views.append(MtpRows(seq, start))
                counts.append(n)
                previous.append(hidden[:n])
                owners.append(seq)
        if not views:
            return
        from hearth.engine.scheduler import Batch

        out = self.runner.run_mtp(Batch(views, counts), torch.cat(previous))
        bs, blocks = self.block_manager.block_size, self.block_manager.blocks
        for seq, view, row in zip(owners, views, out):
            self.last[seq.seq_id] = (seq.num_computed_tokens - 1, row)
            # the blocks whose last row was just written: a prefix hit on them must go on with the same token
            for end in range(-(-(view.num_computed_tokens + 1) // bs) * bs, seq.num_computed_tokens + 1, bs):
                blocks[seq.block_table[end // bs - 1]].next_token = seq.token_ids[end]

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """The first draft from the layer's output at the sequence's last computed position; each further one (up to
        k) from one more row of the layer, chained on its own output: the row at the next position reads the previous
        draft and, in place of the target's hidden state there (not computed yet), the layer's own output before it.
        A chained row writes the layer's cache at a position the sequence has not computed: only inside blocks the
        sequence already holds (the chain stops at a block edge), and the row is written again once the position is
        computed, before anything reads it."""
        from hearth.engine.scheduler import Batch
        from hearth.layers.rejection_sampler import process_row

        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = [i for i, seq in enumerate(seqs) if self.last.get(seq.seq_id, (None,))[0] == seq.num_computed_tokens - 1]
        hidden = torch.stack([self.last[seqs[i].seq_id][1] for i in live]) if live else None
        bs = self.block_manager.block_size
        while live:
            logits = self.runner.mtp_logits(hidden).float()
            going, previous = [], []
            for row, i in enumerate(live):
                seq = seqs[i]
                processed = process_row(logits[row], seq.token_ids + tokens[i], seq.num_prompt_tokens, seq.params)
                if seq.params.is_greedy:
                    token = int(processed.argmax())
                else:
                    token = int(torch.multinomial(processed, 1, generator=seq.generator or self.runner.sampler.generator))
                    probs[i].append(processed)
                tokens[i].append(token)
                position = seq.num_computed_tokens - 1 + len(tokens[i])  # of the chained row that would follow
                if len(tokens[i]) < ks[i] and position // bs < len(seq.block_table):
                    going.append(i)
                    previous.append(hidden[row])
            if not going:
                break
            views = [MtpRows(seqs[i], seqs[i].num_computed_tokens - 1 + len(tokens[i]), tokens[i]) for i in going]
            hidden = self.runner.run_mtp(Batch(views, [1] * len(views)), torch.stack(previous))
            live = going
        return [(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs)]

    def release(self, seq: Sequence) -> None:
        self.runner.hidden_rows.pop(seq.seq_id, None)
        self.last.pop(seq.seq_id, None)
