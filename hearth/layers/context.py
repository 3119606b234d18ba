"""Per-step attention metadata set by the model runner and read by attention (nano-vllm's utils/context.py).

Keeping it out of `forward` signatures keeps model code clean. Set and read on the engine thread that runs the step;
it is thread-local, so several engines (one per loaded model, each on its own thread) never read each other's step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Context:
    # tokens of this step are laid out sequence after sequence; sequence i owns query rows q_starts[i]:q_starts[i+1]
    q_starts: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)  # tokens in the cache after this step, per sequence
    slot_mapping: torch.Tensor | None = None  # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] block ids, 0 padded
    block_size: int = 16
    # decode rows: sequences with exactly one new token, attended in one batched call
    decode_seq_idx: list[int] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # [num_decode] query row of each decode sequence
    decode_context_lens: torch.Tensor | None = None  # [num_decode] int64
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_blocks * block_size] key is in the context
    prefill_seq_idx: list[int] = field(default_factory=list)
    # how many of the prefill sequences are speculative verifications (their last token and a few draft tokens):
    # a step of decodes and verifications only computes its projections as a decode step does
    num_spec_seqs: int = 0
    # a step that is one decode sequence and nothing else: the flat cache slots of its whole context, in order
    # ([context_len]); attention then gathers exactly those keys and needs no mask
    single_decode_slots: torch.Tensor | None = None
    # models with several KV groups (sliding-window and full layers): this step's Context per group, [0] is this one;
    # they differ only in slot_mapping and block tables
    kv_groups: list[Context] = field(default_factory=list)


_LOCAL = threading.local()


def get_context() -> Context:
    try:
        return _LOCAL.context
    except AttributeError:
        _LOCAL.context = Context()
        return _LOCAL.context


def set_context(context: Context) -> None:
    _LOCAL.context = context


def reset_context() -> None:
    _LOCAL.context = Context()
