"""AsyncEngine: the EngineClient the API server holds. One background thread owns the LLMEngine (llama.cpp's
single-owner loop); requests and aborts reach it through a queue, and each request's Deltas come back on its own
asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.protocol import Delta, EngineError, EngineStats, ModelInfo
from hearth.loader.resolve import ModelRef
from hearth.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._state = "ready"
        self._stats = engine.stats

    @classmethod
    def from_model(cls, ref: ModelRef, engine_config: EngineConfig | None = None, device: str = "cpu") -> AsyncEngine:
        return cls(LLMEngine(ref, engine_config, device))

    @property
    def state(self) -> str:
        return self._state

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    @property
    def stats(self) -> EngineStats:
        return self._stats  # refreshed by the engine thread after every step

    async def start(self) -> None:
        self.start_thread()

    def start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hearth-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        self.start_thread()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise EngineError(f"duplicate request id {request_id!r}", 400)
        self._streams[request_id] = (loop, out)
        self._inbox.put(("add", (prompt_ids, params, request_id)))
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away: free the request's resources
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # --- engine thread ---------------------------------------------------------------------------------------------

    def _emit(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, out = stream
            with contextlib.suppress(RuntimeError):  # the event loop is closed
                loop.call_soon_threadsafe(out.put_nowait, item)

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            prompt_ids, params, request_id = payload
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except EngineError as e:
                self._emit(request_id, e)
        elif kind == "abort":
            delta = self.engine.abort(payload)
            if delta is not None:
                self._emit(payload, delta)

    def _loop(self) -> None:
        """Called only on the engine thread: drain the inbox, run a step, hand out the Deltas.

        Idle, it sleeps on the inbox. After a step that finished a request, when the next step will prefill, it waits
        up to `admission_wait_ms` for a new request (EngineConfig): clients that send their next request as soon as
        one finishes then join that step rather than wait the whole of it."""
        finished = False
        wait_s = self.engine.engine_config.admission_wait_ms / 1000
        while not self._stopping:
            block, timeout = not self.engine.has_unfinished(), None
            if not block and finished and wait_s > 0 and self._inbox.empty() and self.engine.scheduler.has_prefill_work():
                block, timeout = True, wait_s
            try:
                while True:
                    kind, payload = self._inbox.get(block=block, timeout=timeout)
                    block = False
                    if kind == "stop":
                        return
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            try:
                deltas = self.engine.step()
            except Exception:
                logger.exception("engine step failed; failing the running requests")
                for request_id in list(self.engine.seqs):
                    self.engine.abort(request_id)
                    self._emit(request_id, EngineError("internal error while generating", 500))
                deltas = []
            self._stats = self.engine.stats
            finished = any(delta.finished for delta in deltas)
            for delta in deltas:
                self._emit(delta.request_id, delta)
