"""The OpenAI-compatible HTTP app: `create_app(engine, tokenizer, chat_template, served_model_name)`.

Depends on the EngineClient protocol only; tests hand it a fake engine. Middleware, outermost first: CORS (only when
origins are given), metrics and the request log, keys + rate limits + audit log (hearth/governance/middleware.py;
its PUBLIC_PATHS need no key), then the body-size limit. The lifespan starts the engine (when it has `start`) and shuts
it down. CPU-heavy request work (chat template rendering, tokenizing prompts) runs in a small thread pool
(`ServerState.off_loop`), so the event loop keeps answering other requests (/health included) meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from hearth.api.errors import DEFAULT_MAX_BODY_BYTES, APIError, BodyLimitMiddleware, install_error_handlers
from hearth.api.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from hearth.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hearth.engine.protocol import EngineClient

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"  # the web chat page
PREP_WORKERS = 4  # threads rendering and tokenizing prompts; more requests wait their turn (off the loop)
T = TypeVar("T")


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
    _token_text: dict[int, str] = field(default_factory=dict)
    _chat_format: Any = None
    _prep_executor: ThreadPoolExecutor | None = None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread. The tokenizer releases the GIL while it encodes, and a template render stops
        itself at its time limit, so neither stalls the loop nor keeps a thread busy after its request is answered."""
        if self._prep_executor is None:
            self._prep_executor = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="hearth-prep")
        return await asyncio.get_running_loop().run_in_executor(self._prep_executor, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the worker threads go (each finishes what it is doing); `off_loop` starts new ones if needed."""
        if self._prep_executor is not None:
            self._prep_executor.shutdown(wait=False, cancel_futures=True)
            self._prep_executor = None

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

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        """400 when the prompt (plus max_tokens, when given) does not fit the context; states both counts."""
        max_len = self.engine.model_info.max_model_len
        if num_prompt_tokens >= max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens, but the prompt has "
                           f"{num_prompt_tokens} tokens; shorten the prompt", 400, param,
                           "context_length_exceeded")  # fmt: skip
        if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
            total = num_prompt_tokens + max_tokens
            raise APIError(f"This model's maximum context length is {max_len} tokens, but {total} tokens were "
                           f"requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion); shorten "
                           "the prompt or lower max_tokens", 400, "max_tokens", "context_length_exceeded")  # fmt: skip

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


def create_app(engine: EngineClient, tokenizer: Any, chat_template: Any, served_model_name: str, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, manage_engine: bool = True,
               reasoning_parser: str | None = None, tool_parser: str | None = None, keys: Any = None,
               audit: Any = None, require_key: bool = False, ledger: Any = None,
               cors_origins: list[str] | None = None) -> FastAPI:  # fmt: skip
    """The ASGI app over `engine`. `chat_template` renders chat messages (None: ChatML). With `manage_engine`, the
    lifespan awaits `engine.start()` and calls `engine.shutdown()` where the engine has them.
    `keys` (a governance KeyStore): once it holds a key (or with `require_key`), routes other than the public ones need
    one. `audit` (an AuditLog): one record per request. `cors_origins`: browser origins allowed (none by default).
    """
    from hearth.api.chat import create_chat_completion
    from hearth.api.completions import create_completion

    if chat_template is None:
        from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate

        chat_template = ChatTemplate(CHATML_TEMPLATE, getattr(tokenizer, "bos_token", None) or "",
                                     getattr(tokenizer, "eos_token", None) or "")  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine and hasattr(engine, "start"):
            await engine.start()
        logger.info("serving %s", served_model_name)
        yield
        state.close()
        if manage_engine and hasattr(engine, "shutdown"):
            engine.shutdown()

    metrics = Metrics()
    state = ServerState(engine, tokenizer, chat_template, served_model_name, metrics, reasoning_parser, tool_parser)
    app = FastAPI(title="Hearth", summary="OpenAI-compatible API of a local model", lifespan=lifespan)
    app.state.hearth = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if keys is not None or audit is not None or require_key or ledger is not None:
        from hearth.governance.middleware import GovernanceMiddleware

        app.add_middleware(GovernanceMiddleware, keys=keys, audit=audit, require_key=require_key,
                           served_model_name=served_model_name, ledger=ledger)  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip

    @app.get("/health")
    async def get_health() -> JSONResponse:
        status = engine.state
        code = 200 if status == "ready" else 503
        return JSONResponse({"status": status, "model": served_model_name}, status_code=code)

    @app.get("/v1/models")
    async def get_models() -> ModelList:
        return ModelList(data=[state.model_card()])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def post_chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def post_completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        metrics.update_engine(engine.stats)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # the web chat page and its assets: public (no key), so the page can load and then ask for one
    @app.get("/", include_in_schema=False)
    async def get_index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    return app
