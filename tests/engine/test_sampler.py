"""The Sampler and its helpers on hand-made logits: greedy, top-k, top-p, min-p, penalties, logprobs, and seeded
generators that make a row's draws reproducible whatever else is in the batch. (Extreme parameter values and
non-finite logits are in test_engine_faults.py.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.layers.sampler import Sampler, apply_penalties, filter_logits
from hearth.sampling_params import SamplingParams


def row(params: SamplingParams, token_ids=(1, 2), num_prompt=2) -> SimpleNamespace:
    """What the sampler reads from a Sequence."""
    return SimpleNamespace(params=params, token_ids=list(token_ids), num_prompt_tokens=num_prompt)


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300, seed: int = 0) -> set[int]:
    sampler = Sampler(seed)
    return {sampler(logits, [row(params)], [None])[0][0] for _ in range(n)}


def test_greedy_takes_the_argmax_whatever_the_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    seqs = [row(SamplingParams(temperature=0))] * 4
    for seed in range(3):
        gens = [torch.Generator().manual_seed(seed)] * 4
        token_ids, logprobs = Sampler(seed)(logits, seqs, gens)
        assert token_ids == logits.argmax(-1).tolist()
        assert logprobs == [None] * 4  # none asked for


def test_top_k_keeps_only_the_k_most_likely():
    probs = [0.05, 0.3, 0.1, 0.25, 0.2, 0.1]
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, top_k=1)) == {1}
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, top_k=3)) == {1, 3, 4}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, top_p=0.5)) == {0}  # 0.5 alone reaches 0.5
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, top_p=0.6)) == {0, 1}
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, top_p=0.9)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = [0.4, 0.3, 0.19, 0.11]
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}  # floor 0.2
    assert draws(logits_for(probs), SamplingParams(temperature=1.0, min_p=0.25)) == {0, 1, 2, 3}  # floor 0.1


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30), min_size=2, max_size=40),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_filter_logits_always_keeps_the_best_token_and_only_masks(logits, top_k, top_p, min_p):
    x = torch.tensor(logits)
    out = filter_logits(x, top_k, top_p, min_p)
    assert out[int(x.argmax())] == x.max()
    kept = out > float("-inf")
    assert torch.equal(out[kept], x[kept])  # kept logits are unchanged
    if 0 < top_k < len(logits):
        assert int(kept.sum()) <= top_k + int((x == torch.topk(x, top_k).values[-1]).sum()) - 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 3.0, 1.0])
    apply_penalties(logits, [0, 1, 1], num_prompt=3, params=SamplingParams(repetition_penalty=2.0))
    assert logits.tolist() == [1.0, -4.0, 3.0, 1.0]  # prompt tokens count too; unseen ones are untouched


def test_presence_and_frequency_penalties_count_only_generated_tokens():
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [4, 4, 2, 2, 2, 1], num_prompt=2, params=params)  # output: 2, 2, 2, 1
    assert logits.tolist() == pytest.approx([0.0, -0.75, -1.25, 0.0, 0.0])


def test_penalties_change_what_greedy_picks():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    token_ids, _ = Sampler()(logits, [row(params, token_ids=[5, 0], num_prompt=1)], [None])
    assert token_ids == [1]
    token_ids, _ = Sampler()(logits, [row(SamplingParams(temperature=0), token_ids=[5, 0], num_prompt=1)], [None])
    assert token_ids == [0]


def test_logprobs_are_the_raw_distributions_with_the_top_alternatives():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=10.0, logprobs=2)
    (token_id,), (lp,) = Sampler()(logits, [row(params, token_ids=[0], num_prompt=1)], [None])
    raw = logits[0].log_softmax(-1)
    assert token_id == 2  # the penalty moved the choice ...
    assert lp.token_id == 2 and lp.logprob == pytest.approx(float(raw[2]))  # ... not the reported distribution
    assert [t for t, _ in lp.top] == [0, 2] and lp.top[0][1] == pytest.approx(float(raw[0]))
    _, (lp0,) = Sampler()(logits, [row(SamplingParams(temperature=0, logprobs=0))], [None])
    assert lp0.top == [] and math.isfinite(lp0.logprob)


def test_a_seeded_row_draws_the_same_whatever_the_batch():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(7))
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)

    def sample_seeded(batch_rows: list[int], sampler_seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(42)
        sampler = Sampler(sampler_seed)
        out = []
        for _ in range(20):
            seqs = [row(seeded if i == 0 else other) for i in batch_rows]
            gens = [gen if i == 0 else None for i in batch_rows]
            token_ids, _ = sampler(logits[batch_rows], seqs, gens)
            out.append(token_ids[batch_rows.index(0)])
        return out

    alone = sample_seeded([0], 0)
    assert sample_seeded([1, 0, 2], 5) == alone  # other rows and the sampler's own seed change nothing
    assert len(set(alone)) > 1  # it does sample


def test_unseeded_rows_follow_the_samplers_seed():
    logits = torch.zeros(1, 1000)
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        sampler = Sampler(seed)
        return [sampler(logits, [row(params)], [None])[0][0] for _ in range(10)]

    assert run(3) == run(3)
    assert run(3) != run(4)
