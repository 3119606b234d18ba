"""The seam between the API server and the engine (vLLM's EngineClient, small).

The server holds an `EngineClient`; tests hand it a fake. The engine detokenizes and applies stop strings, so a
`Delta` carries both the new token ids and the new text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from hearth.sampling_params import SamplingParams, TokenLogprob


@dataclass(slots=True)
class Delta:
    """What one request produced since its last Delta."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: EngineError | None = None  # with finish_reason "error": why the engine failed this request


@dataclass(slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    architecture: str
    quantization: str | None = None


@dataclass(slots=True)
class EngineStats:
    """A snapshot for /metrics and /health."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_kvcache_blocks: int = 0
    # speculative decoding, since the engine started: draft tokens scored, and those kept
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the API should answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class EngineFatalError(Exception):
    """The engine cannot go on (its state can no longer be trusted): every request fails and the engine is dead."""


class EngineClient(Protocol):
    """What the API server needs from an engine."""

    @property
    def state(self) -> str:  # "loading" | "ready" | "failed" (did not load) | "dead" (stopped after a fatal error)
        ...

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def stats(self) -> EngineStats: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """Stream the request's output; the last Delta has finished=True. Raises EngineError on refusal."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; its stream ends with finish_reason "abort"."""
        ...
