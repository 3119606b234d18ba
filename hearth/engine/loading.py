"""LoadingEngine: the EngineClient the server holds while the model loads in a thread, so that it can listen at once
and answer 503 "loading" (then "failed" if the load raised) until the engine is ready; from then on it forwards to the
loaded engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from hearth.engine.protocol import EngineStats

logger = logging.getLogger(__name__)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LoadingEngine:
    """Stands in for the engine while it loads (in a thread), so the server answers 503 "loading" meanwhile."""

    def __init__(self, load: Callable[[], Any], on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._load = load
        self._on_failure = on_failure
        self._engine: Any = None
        self._failed = False
        self._task: asyncio.Task | None = None

    @property
    def state(self) -> str:
        if self._engine is not None:
            return self._engine.state
        return "failed" if self._failed else "loading"

    @property
    def model_info(self):
        return self._engine.model_info

    @property
    def stats(self):
        return self._engine.stats if self._engine is not None else EngineStats()

    def generate(self, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
        return self._engine.generate(prompt_ids, params, request_id)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._load_in_background())

    async def _load_in_background(self) -> None:
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future = loop.create_future()

        def load() -> None:  # a daemon thread, so Ctrl-C during a long load does not wait for it
            try:
                result, error = self._load(), None
            except BaseException as e:
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the server stopped meanwhile
                loop.call_soon_threadsafe(_settle, loaded, result, error)

        threading.Thread(target=load, name="hearth-load", daemon=True).start()
        try:
            engine = await loaded
            if self._on_failure is not None and hasattr(engine, "on_dead"):
                engine.on_dead = self._on_failure  # the engine thread dying later stops the server too
            await engine.start()
            self._engine = engine
            logger.info("model loaded; ready")
        except Exception as e:
            self._failed = True
            logger.error("loading the model failed: %s", e)
            if self._on_failure is not None:
                self._on_failure(e)

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._engine is not None:
            self._engine.shutdown()
