"""AsyncEngine: the EngineClient the API server holds. One background thread owns the LLMEngine (llama.cpp's
single-owner loop); requests and aborts reach it through a queue, and each request's Deltas come back on its own
asyncio queue.

A request the engine fails (LLMEngine.step isolates the sequence that made a step raise) gets its EngineError. When
anything escapes the loop (EngineFatalError, or a bug), the engine is dead: its state says so (/health answers 503),
every request waiting and every later one gets a 503, and `on_dead` is called (`hearth serve` then stops the server and
exits non-zero, for a supervisor to restart it). A dead engine is never restarted in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.protocol import Delta, EngineError, EngineStats, ModelInfo
from hearth.loader.resolve import ModelRef
from hearth.sampling_params import SamplingParams
from hearth.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEAD_MESSAGE = "the engine stopped after an internal error; the server is restarting, retry shortly"
LIVENESS_POLL_S = 1.0  # a waiting stream checks this often that the engine thread is still alive


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
        self.on_dead: Callable[[BaseException], None] | None = None  # called on the engine thread when it dies

    @classmethod
    def from_model(cls, ref: ModelRef, engine_config: EngineConfig | None = None, device: str = "cpu",
                   tokenizer: Tokenizer | None = None) -> AsyncEngine:  # fmt: skip
        return cls(LLMEngine(ref, engine_config, device, tokenizer))

    @property
    def state(self) -> str:
        thread = self._thread
        if self._state == "ready" and thread is not None and not thread.is_alive() and not self._stopping:
            return "dead"  # the thread ended without getting to _die
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
        if self.state == "dead":
            raise EngineError(DEAD_MESSAGE, 503)
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
                try:
                    item = await asyncio.wait_for(out.get(), LIVENESS_POLL_S)
                except asyncio.TimeoutError:  # noqa: UP041 (not the builtin before Python 3.11)
                    # _die fails every stream it sees; this catches one registered as it ran, or a thread that
                    # ended without it
                    if self.state == "dead":
                        finished = True
                        raise EngineError(DEAD_MESSAGE, 503) from None
                    continue
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
        if isinstance(item, Delta) and item.error is not None:
            item = item.error
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
            except Exception as e:  # a bug admitting this request: it alone fails
                logger.error("admitting request %s failed (%s)", request_id, type(e).__name__, exc_info=e)
                self._emit(request_id, EngineError("internal error while admitting the request", 500))
        elif kind == "abort":
            delta = self.engine.abort(payload)
            if delta is not None:
                self._emit(payload, delta)

    def _loop(self) -> None:
        """The engine thread's body: `_serve` until stopped; whatever escapes it kills the engine (`_die`)."""
        try:
            self._serve()
        except BaseException as e:
            self._die(e)
        finally:
            close = getattr(self.engine, "close", None)  # other tensor-parallel ranks stop with this thread
            if close is not None:
                close()

    def _die(self, error: BaseException) -> None:
        """Mark the engine dead, fail every request waiting with a 503 and call `on_dead`."""
        self._state = "dead"  # before the streams are read: a stream registered after this sees it when it polls
        logger.critical("the engine thread died (%s: %s); failing every request with 503", type(error).__name__,
                        error, exc_info=error)  # fmt: skip
        try:
            for request_id in list(self._streams):
                self._emit(request_id, EngineError(DEAD_MESSAGE, 503))
        finally:
            if self.on_dead is not None:
                self.on_dead(error)

    def _serve(self) -> None:
        """Drain the inbox, run a step, hand out the Deltas.

        Idle, it sleeps on the inbox; with work, it waits on the inbox as long as the engine's admission policy asks
        (`LLMEngine.admission_wait_s`: new requests may join the next step), then steps."""
        while not self._stopping:
            if self.engine.has_unfinished():
                wait_s = self.engine.admission_wait_s()
                block, timeout = wait_s > 0, wait_s
            else:
                block, timeout = True, None
            try:
                while True:
                    kind, payload = self._inbox.get(block=block, timeout=timeout)
                    block = False
                    if kind == "stop":
                        return
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            deltas = self.engine.step()  # a request's own failure comes back as its Delta; anything raised is fatal
            self._stats = self.engine.stats
            for delta in deltas:
                self._emit(delta.request_id, delta)
