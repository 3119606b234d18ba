"""Batched sampling with per-sequence parameters: penalties, grammar masks, temperature, top-k, top-p, min-p, seeds,
logprobs.

Logprobs are those of the model's raw distribution (before penalties and temperature), as OpenAI reports them.

Every step is safe for the parameter ranges SamplingParams admits: a logit that penalties or temperature push to +inf
is clamped to float32's largest value once scaled (greedy rows take the argmax, which +inf does not disturb), top-p
always keeps the most likely token and min-p never drops it, so each row keeps at least one finite logit and
softmax/multinomial get a proper distribution (a grammar mask always allows at least one token: engine/structured.py
checks). Logits the model itself made NaN or +inf raise a ValueError naming the rows, which the engine turns into an
error for those requests alone.
"""

from __future__ import annotations

import torch

from hearth.sampling_params import SamplingParams, TokenLogprob

FLOAT_MAX = torch.finfo(torch.float32).max


def apply_penalties(logits: torch.Tensor, token_ids: list[int], num_prompt: int, params: SamplingParams) -> None:
    """In place on one row: repetition penalty (HF style, over prompt and output), presence/frequency (OpenAI)."""
    if params.repetition_penalty != 1.0 and token_ids:
        ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
        scores = logits[ids]
        logits[ids] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    output = token_ids[num_prompt:]
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus and the min-p floor, for one row of scaled logits."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # stable: among tied logits the lowest id comes first, the one argmax (greedy) picks
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first is always kept (a top_p that rounds
        # to 0 in float32 would drop it too)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list, generators: list[torch.Generator | None],
                 banned: tuple[list[int], torch.Tensor] | None = None):  # fmt: skip
        """logits [num_seqs, vocab] -> (token ids, per-sequence TokenLogprob or None).

        `banned`: (rows, bool [len(rows), vocab]) tokens those rows may not pick (outside a grammar): set to -inf after
        the penalties, before greedy, temperature and top-k/p/min-p."""
        logits = logits.float()
        bad = ~(logits < float("inf")).all(-1)  # a NaN or +inf logit: nothing sensible can be sampled from the row
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"the model produced NaN or infinite logits for batch rows {rows}")
        raw = logits
        want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        token_ids: list[int] = []
        logits = logits.clone()
        greedy_rows = [i for i, seq in enumerate(seqs) if seq.params.is_greedy]
        for i, seq in enumerate(seqs):
            apply_penalties(logits[i], seq.token_ids, seq.num_prompt_tokens, seq.params)
        if banned is not None:
            rows, mask = banned[0], banned[1].to(logits.device)
            if len(rows) == len(seqs):  # every row constrained: one call
                logits.masked_fill_(mask, float("-inf"))
            else:
                for k, i in enumerate(rows):
                    logits[i].masked_fill_(mask[k], float("-inf"))
        greedy = logits.argmax(-1).tolist() if greedy_rows else []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.is_greedy:
                token_ids.append(greedy[i])
                continue
            row = filter_logits((logits[i] / p.temperature).clamp_(max=FLOAT_MAX), p.top_k, p.top_p, p.min_p)
            probs = row.softmax(-1)
            gen = generators[i] or self.generator
            token_ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if want_logprobs:
            all_lp = raw.log_softmax(-1)
            for i, seq in enumerate(seqs):
                k = seq.params.logprobs
                if k is None:
                    continue
                top = []
                if k > 0:
                    values, ids = torch.topk(all_lp[i], k)
                    top = list(zip(ids.tolist(), values.tolist()))
                logprobs[i] = TokenLogprob(token_ids[i], float(all_lp[i, token_ids[i]]), top)
        return token_ids, logprobs
