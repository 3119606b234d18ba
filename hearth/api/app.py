"""The HTTP app, OpenAI-compatible and with Anthropic's Messages API: `create_app(engine, tokenizer, chat_template,
served_model_name)` serves one model; with `models` (a ModelRegistry over the local stores) it serves every model
there, loaded on first use (hearth/api/models.py), with `engine` (when given) as the preloaded default.

Depends on the EngineClient protocol only; tests hand it a fake engine. Middleware, outermost first: CORS (only when
origins are given), metrics and the request log, keys + rate limits + audit log (hearth/governance/middleware.py;
its PUBLIC_PATHS need no key), then the body-size limit, then the model leases (LeaseMiddleware). The lifespan starts
the engine (when it has `start`) and the registry's keep-alive reaper, and shuts both down. What the routes share
lives in hearth/api/state.py (ServerState; `await state.engine_for(body.model)` is the one way a route gets its
model); the generating routes are hearth/api/chat.py and hearth/api/completions.py, both built on
hearth/api/fanout.py, and hearth/api/responses.py and hearth/api/messages.py, translated onto chat.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from hearth.api.errors import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware, install_error_handlers
from hearth.api.messages_protocol import CountTokensRequest, MessagesRequest
from hearth.api.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from hearth.api.models import LeaseMiddleware, ModelRegistry
from hearth.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hearth.api.responses import ResponsesRequest
from hearth.api.state import ServerState
from hearth.engine.protocol import EngineClient

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"  # the web chat page


def create_app(engine: EngineClient | None, tokenizer: Any, chat_template: Any, served_model_name: str | None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, manage_engine: bool = True,
               reasoning_parser: str | None = None, tool_parser: str | None = None, keys: Any = None,
               audit: Any = None, require_key: bool = False, ledger: Any = None,
               cors_origins: list[str] | None = None, responses_store: Any = None,
               models: ModelRegistry | None = None) -> FastAPI:  # fmt: skip
    """The ASGI app over `engine`. `chat_template` renders chat messages (None: ChatML). With `manage_engine`, the
    lifespan awaits `engine.start()` and calls `engine.shutdown()` where the engine has them. `models`: a registry
    with a model source, to serve every model there (`engine`, when not None, is then the preloaded default).
    `keys` (a governance KeyStore): once it holds a key (or with `require_key`), routes other than the public ones need
    one. `audit` (an AuditLog): one record per request. `cors_origins`: browser origins allowed (none by default).
    `responses_store` (a ResponseStore): where /v1/responses keeps what `store` asks for (None: nothing is kept).
    """
    from hearth.api.chat import create_chat_completion
    from hearth.api.completions import create_completion
    from hearth.api.messages import count_message_tokens, create_message
    from hearth.api.responses import create_response, delete_response, get_response, list_input_items

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine and engine is not None and hasattr(engine, "start"):
            await engine.start()
        await registry.start()
        logger.info("serving %s", served_model_name or "the local models")
        yield
        await registry.shutdown()
        state.close()
        if manage_engine and engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()

    metrics = Metrics()
    registry = models if models is not None else ModelRegistry()
    registry.metrics = metrics
    if engine is not None:
        assert served_model_name is not None
        state = registry.add_default(served_model_name, engine, tokenizer, chat_template, metrics, reasoning_parser,
                                     tool_parser)  # fmt: skip
    else:  # no default model: routes reach the registry's models through engine_for
        state = ServerState(None, None, None, "", metrics, prep=registry.prep, models=registry)  # type: ignore[arg-type]
    app = FastAPI(title="Hearth", summary="OpenAI-compatible API of a local model", lifespan=lifespan)
    app.state.hearth = state
    app.state.models = registry
    install_error_handlers(app)
    app.add_middleware(LeaseMiddleware, registry=registry)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if keys is not None or audit is not None or require_key or ledger is not None:
        from hearth.governance.middleware import GovernanceMiddleware

        app.add_middleware(GovernanceMiddleware, keys=keys, audit=audit, require_key=require_key,
                           served_model_name=served_model_name, ledger=ledger)  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version",
                                          "anthropic-beta"])  # fmt: skip

    @app.get("/health")
    async def get_health() -> JSONResponse:
        if engine is None:  # the server is up; each model loads on its first request
            return JSONResponse({"status": "ready", "models": [e.name for e in registry.loaded()]})
        status = engine.state
        code = 200 if status == "ready" else 503
        return JSONResponse({"status": status, "model": served_model_name}, status_code=code)

    def card_json(card: ModelCard) -> dict[str, Any]:
        return card.model_dump(exclude={"loaded"} if card.loaded is None else None)

    @app.get("/v1/models", response_model=ModelList)
    async def get_models() -> JSONResponse:
        cards = await registry.model_cards()
        return JSONResponse({"object": "list", "data": [card_json(c) for c in cards]})

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> JSONResponse:
        for card in await registry.model_cards():
            if card.id == model_id:
                return JSONResponse(card_json(card))
        raise registry.not_found(model_id)

    @app.get("/api/ps")
    async def get_ps() -> JSONResponse:
        """The loaded models: name, memory (bytes, as planned), processor, when each unloads (Unix time; null: never)."""
        return JSONResponse({"models": registry.ps()})

    @app.post("/v1/chat/completions")
    async def post_chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def post_completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/responses")
    async def post_responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(state, responses_store, body, request)

    @app.get("/v1/responses/{response_id}")
    async def get_responses(response_id: str, request: Request) -> Response:
        return await get_response(responses_store, response_id, request)

    @app.get("/v1/responses/{response_id}/input_items")
    async def get_input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc",
                              after: str | None = None) -> Response:  # fmt: skip
        return await list_input_items(responses_store, response_id, request, limit, order, after)

    @app.delete("/v1/responses/{response_id}")
    async def delete_responses(response_id: str, request: Request) -> Response:
        return await delete_response(responses_store, response_id, request)

    @app.post("/v1/messages")
    async def post_messages(body: MessagesRequest, request: Request) -> Response:
        return await create_message(state, body, request)

    @app.post("/v1/messages/count_tokens")
    async def post_count_tokens(body: CountTokensRequest) -> Response:
        return await count_message_tokens(state, body)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        metrics.update_engines({(e.name, id(e.state.engine)): e.state.engine.stats for e in registry.loaded()
                                if e.state.engine is not None})  # fmt: skip
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # the web chat page and its assets: public (no key), so the page can load and then ask for one
    @app.get("/", include_in_schema=False)
    async def get_index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    return app
