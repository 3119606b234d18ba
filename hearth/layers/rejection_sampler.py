"""Speculative verification: which draft tokens a sequence keeps, and the token that follows them.

The target model scored the sequence's last committed token and its k draft tokens in one forward, giving k+1 rows of
logits: row j is the target's distribution for the token after draft j (row 0: after the committed token). Each row is
processed exactly as the plain sampler processes a decode row (penalties over the history up to that position,
temperature, top-k, top-p, min-p: the functions of hearth/layers/sampler.py), so that

- greedy: draft j is kept while it is the argmax of row j; the first mismatch is replaced by the argmax, and when every
  draft is kept the argmax of the last row is added. The output is token for token what plain decoding gives.
- sampling: draft x_j is kept with probability min(1, p_j(x) / q_j(x)), where q_j is the proposer's distribution (a
  point mass for proposers that guess one token, such as prompt lookup); on the first rejection a token is drawn from
  max(0, p_j - q_j), renormalised, and verification stops; when all are kept one more token is drawn from p_{k}. Each
  emitted token is then distributed exactly as the target model's own sample would be.

The draws use the sequence's own generator when it has one (seeded requests are reproducible) and the engine's
otherwise. No library implements this over Hearth's per-sequence parameters, hence this small module.
"""

from __future__ import annotations

import torch

from hearth.layers.sampler import FLOAT_MAX, apply_penalties, filter_logits
from hearth.sampling_params import SamplingParams, TokenLogprob


def process_row(logits: torch.Tensor, history: list[int], num_prompt: int, params: SamplingParams) -> torch.Tensor:
    """One float32 row of raw logits -> what the sampler draws from: penalised logits for a greedy request (argmax),
    probabilities for a sampled one."""
    row = logits.float().clone()
    apply_penalties(row, history, num_prompt, params)
    if params.is_greedy:
        return row
    row = filter_logits((row / params.temperature).clamp_(max=FLOAT_MAX), params.top_k, params.top_p, params.min_p)
    return row.softmax(-1)


def verify(logits: torch.Tensor, token_ids: list[int], num_prompt: int, params: SamplingParams, drafts: list[int],
           draft_probs: torch.Tensor | None, generator: torch.Generator) -> list[int]:  # fmt: skip
    """The tokens a sequence emits this step: the kept drafts, then one corrected or bonus token (1..k+1 tokens).

    logits: [k+1, vocab] raw target logits; token_ids: the sequence's committed tokens (prompt and output);
    drafts: k proposed tokens; draft_probs: [k, vocab] the proposer's processed distributions, or None for a point
    mass on each draft; generator: where the random draws come from."""
    k = len(drafts)
    assert logits.shape[0] == k + 1
    history = list(token_ids)
    out: list[int] = []
    for j in range(k + 1):
        processed = process_row(logits[j], history, num_prompt, params)
        if params.is_greedy:
            token = int(processed.argmax())
            out.append(token)
            if j < k and token == drafts[j]:
                history.append(token)
                continue
            return out
        p = processed
        if j == k:  # every draft kept: the bonus token, from the target's own distribution
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return out
        draft = drafts[j]
        q_x = 1.0 if draft_probs is None else float(draft_probs[j, draft])
        p_x = float(p[draft])
        u = float(torch.rand((), generator=generator))
        if q_x > 0 and u * q_x < p_x:  # kept with probability min(1, p/q)
            out.append(draft)
            history.append(draft)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[draft] = 0.0
        else:
            residual = (p - draft_probs[j].to(p.dtype)).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p and q agree where p has mass: rounding made this reject, draw from p
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int | None) -> list[TokenLogprob | None]:
    """Row i's raw log-probability of tokens[i] with its top-k alternatives (the plain sampler's logprobs)."""
    if k is None:
        return [None] * len(tokens)
    all_lp = logits[: len(tokens)].float().log_softmax(-1)
    result: list[TokenLogprob | None] = []
    for i, token in enumerate(tokens):
        top = []
        if k > 0:
            values, ids = torch.topk(all_lp[i], k)
            top = list(zip(ids.tolist(), values.tolist()))
        result.append(TokenLogprob(token, float(all_lp[i, token]), top))
    return result
