"""ServerState: what every route needs for one served model (the engine, the tokenizer and chat template, the served
name, the metrics) and the checks they share. CPU-heavy request work (chat template rendering, tokenizing prompts) runs
in a small thread pool (`ServerState.off_loop`, shared by the models of one server), so the event loop keeps answering
other requests (/health included) meanwhile.

Routes get the model a request names with `await state.engine_for(body.model)`: the ServerState of that model, ready
to generate (loaded on first use when the server serves several, hearth/api/models.py), or an APIError (404 for a
model the server does not have, 503 while it cannot be served yet).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hearth.api.errors import APIError
from hearth.api.metrics import Metrics
from hearth.api.protocol import ModelCard
from hearth.engine.protocol import EngineClient

PREP_WORKERS = 4  # threads rendering and tokenizing prompts; more requests wait their turn (off the loop)
T = TypeVar("T")


class PrepPool:
    """The worker threads that render and tokenize prompts, shared by every model of a server."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="hearth-prep")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the worker threads go (each finishes what it is doing); `run` starts new ones if needed."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


@dataclass
class ServerState:
    """What every route needs: the engine, the tokenizer and template, the served name, the metrics."""

    engine: EngineClient
    tokenizer: Any
    chat_template: Any
    served_model_name: str
    metrics: Metrics
    reasoning_parser: str | None = None
    tool_parser: str | None = None
    prep: PrepPool = field(default_factory=PrepPool)
    models: Any = None  # the server's ModelRegistry (hearth/api/models.py); None: this one model only
    _token_text: dict[int, str] = field(default_factory=dict)
    _chat_format: Any = None

    async def engine_for(self, model: str | None, keep_alive: float | str | None = None) -> ServerState:
        """The state of the model a request names (None: this server's default model), ready to generate: the one
        accessor routes use. `keep_alive` (seconds or a duration such as "10m"; 0 unloads after the request, -1
        never) applies where the server loads models on demand."""
        if self.models is not None:
            return await self.models.get(model, keep_alive)
        self.check_ready()
        self.check_model(model)
        return self

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread. The tokenizer releases the GIL while it encodes, and a template render stops
        itself at its time limit, so neither stalls the loop nor keeps a thread busy after its request is answered."""
        return await self.prep.run(fn, *args)

    def close(self) -> None:
        """Let the worker threads go (each finishes what it is doing); `off_loop` starts new ones if needed."""
        self.prep.close()

    @property
    def chat_format(self) -> Any:
        """How chats are rendered and outputs parsed for this model (decided once the model is loaded)."""
        if self._chat_format is None:
            from hearth.chat.format import chat_format

            self._chat_format = chat_format(self.tokenizer, self.chat_template, self.engine.model_info.architecture,
                                            self.reasoning_parser, self.tool_parser)  # fmt: skip
        return self._chat_format

    def check_ready(self) -> None:
        state = self.engine.state
        if state == "dead":
            raise APIError("the engine stopped after an internal error; the server is restarting, retry shortly", 503)
        if state != "ready":
            raise APIError(f"the model is {state}, not ready yet; retry shortly", 503)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.served_model_name!r}", 404,
                           "model", "model_not_found")  # fmt: skip

    def check_length(self, prompt_lengths: list[int], max_tokens: int | None, param: str) -> int:
        """The one place prompt lengths meet the context: 400 when a prompt (plus max_tokens, when given) does not fit,
        stating both counts; otherwise the room left for a completion after the longest prompt."""
        max_len = self.engine.model_info.max_model_len
        for num_prompt_tokens in prompt_lengths:
            if num_prompt_tokens >= max_len:
                raise APIError(f"This model's maximum context length is {max_len} tokens, but the prompt has "
                               f"{num_prompt_tokens} tokens; shorten the prompt", 400, param,
                               "context_length_exceeded")  # fmt: skip
            if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
                total = num_prompt_tokens + max_tokens
                raise APIError(f"This model's maximum context length is {max_len} tokens, but {total} tokens were "
                               f"requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion); "
                               "shorten the prompt or lower max_tokens", 400, "max_tokens",
                               "context_length_exceeded")  # fmt: skip
        return max_len - max(prompt_lengths)

    def token_text(self, token_id: int) -> str:
        """One token's text for logprobs (special tokens included)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def model_card(self) -> ModelCard:
        if self.engine.state != "ready":
            return ModelCard(id=self.served_model_name)
        fmt = self.chat_format
        capabilities = (["reasoning"] if fmt.has_reasoning else []) + (["reasoning_effort"] if fmt.harmony else [])
        if fmt.harmony or fmt.tool_parser:
            capabilities.append("tools")
        return ModelCard(id=self.served_model_name, max_model_len=self.engine.model_info.max_model_len,
                         capabilities=capabilities)  # fmt: skip
