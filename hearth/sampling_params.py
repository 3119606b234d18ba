"""Per-request sampling parameters (vLLM's names), and the per-token logprobs they may ask for. Stdlib only.

Validation happens here, before a request is admitted, so that the sampler only ever sees numbers it computes with
exactly (float32 logits): a value it cannot use is a ValueError, which the API answers with a 400.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

# Below this temperature sampling is greedy (vLLM's rule): dividing float32 logits by a smaller one overflows, and the
# distribution is a one-hot on the top token long before then.
GREEDY_TEMPERATURE = 1e-5
# The largest temperature accepted: far past the point where the distribution is flat, and small enough that
# logits / temperature is computed without underflow turning masked (-inf) tokens into NaN.
MAX_TEMPERATURE = 1e4
# Repetition penalties outside this range are refused: a logit divided or multiplied by the penalty must stay finite
# in float32 even after the smallest non-greedy temperature divides it (1e2 * 1e2 / 1e-5 is far from overflow).
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _show(value: int) -> str:
    """An integer for an error message, without printing thousands of digits."""
    return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"


def _real(name: str, value) -> float:
    """`value` as a finite float, or ValueError (NaN, infinities, numbers too large for a float, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        number = math.inf
    if not math.isfinite(number):
        shown = _show(value) if isinstance(value, int) else repr(value)
        raise ValueError(f"{name} must be a finite number, got {shown}")
    return number


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclass(slots=True)
class TokenLogprob:
    """One generated token's log-probability, with the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark")


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on the generated text: `kind` (GRAMMAR_KINDS) and its `source` (a JSON Schema as JSON text, a
    regular expression, a Lark grammar; unused for json_object).

    `trigger`: token ids after which the constraint starts (the end of the model's reasoning, a harmony final-channel
    header); the output is free until they first appear in it. Empty: constrained from the first generated token."""

    kind: str
    source: str = ""
    trigger: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "trigger", tuple(_integer("trigger", t) for t in self.trigger))


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 is greedy, and so is any temperature below GREEDY_TEMPERATURE. `seed` makes sampling reproducible
    for this request alone. `logprobs` is the number of top alternatives to return with each sampled token's
    log-probability (None: no logprobs; 0: the sampled token's only). `stop` strings end generation and never appear
    in the returned text. `grammar`: the output must match it (from its trigger on); complete, the request stops.

    Every number must be finite. Ranges: temperature [0, MAX_TEMPERATURE]; top_p (0, 1] (however small, the most
    likely token is always kept); min_p [0, 1]; top_k -1, 0 or positive; repetition_penalty within
    REPETITION_PENALTY_RANGE; presence and frequency penalties [-2, 2]; seed within SEED_RANGE.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    max_tokens: int | None = 256  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        self.stop_token_ids = [_integer("stop_token_ids", t) for t in self.stop_token_ids]
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, _real(name, getattr(self, name)))
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f"grammar must be a Grammar, got {type(self.grammar).__name__}")
        self.top_k = _integer("top_k", self.top_k)
        for name in ("max_tokens", "seed", "logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name)))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {_show(self.top_k)}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {_show(self.max_tokens)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {_show(self.logprobs)}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be between {low:g} and {high:g}, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit integer (between {SEED_RANGE[0]} and {SEED_RANGE[1]}), "
                             f"got {_show(self.seed)}")  # fmt: skip

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
