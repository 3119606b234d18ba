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
                 "num_preemptions", "arrival_step", "grammar")  # fmt: skip
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
