"""Sequence: one request's state between the scheduler, the block manager and the model runner."""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import TYPE_CHECKING

from hearth.sampling_params import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    import torch


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    __slots__ = ("seq_id", "request_id", "status", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "num_cached_tokens", "block_tables", "block_hashes", "params", "generator", "finish_reason", "logprobs",
                 "num_preemptions", "arrival_step", "grammar", "spec_tokens", "spec_probs", "spec_k", "spec_skip",
                 "spec_misses", "spec_pauses", "spec_last", "num_draft_tokens", "num_accepted_tokens")  # fmt: skip
    _counter = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 generator: torch.Generator | None = None):  # fmt: skip
        self.seq_id = next(Sequence._counter)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        # one block table per KV group (BlockManager.windows); -1 marks a block a sliding group gave back
        self.block_tables: list[list[int]] = [[]]
        self.block_hashes: list[int] = []  # chain hash of each full block of token_ids, as far as committed
        self.params = params
        self.generator = generator  # the sequence's own random stream when its params carry a seed, else None
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.num_preemptions = 0
        self.arrival_step = 0  # the scheduler's step count when it was queued
        self.grammar = None  # structured.SequenceGrammar when its params carry a grammar
        # speculative decoding (engine/speculative.py): this step's draft tokens, scored after the last token; the
        # proposer's distributions for them ([k, vocab], None: a point mass on each)
        self.spec_tokens: list[int] = []
        self.spec_probs: torch.Tensor | None = None
        self.spec_k = -1  # drafts to ask for next (adapted to acceptance); -1: not set yet
        self.spec_skip = 0  # steps left without drafts after repeated rejections
        self.spec_misses = 0  # verifications in a row that kept no draft
        self.spec_pauses = 0  # times speculation was paused for this sequence
        self.spec_last: tuple[int, int] | None = None  # (drafted, accepted) of the last verification
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def block_table(self) -> list[int]:
        """The first group's table (the only one for models without sliding-window layers)."""
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, table: list[int]) -> None:
        self.block_tables[0] = table

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
