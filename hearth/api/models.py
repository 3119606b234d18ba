"""ModelRegistry: the models one server serves, by name. `hearth serve` with no model (or with one, preloaded as the
default) serves every model `hearth list` shows: a request naming one loads it on first use, in a thread, while the
server keeps answering; requests that arrive meanwhile wait for the same load, for at most `load_timeout` seconds (then
503), and a load that fails answers 400 to them and leaves the other models serving. Each loaded model has its own
engine thread (AsyncEngine), so requests to different models run at the same time.

Unloading: a model idle for its keep-alive (the server's `--keep-alive`, or the last request's `keep_alive`: seconds
or a duration such as "10m"; 0 unloads once the request is answered, a negative value never) is unloaded by a reaper
task; when loading a model would take the loaded ones past the memory budget, the least recently used idle models are
unloaded first. A model is in use from the moment a request is handed its state until that request's response has been
sent (`LeaseMiddleware` counts it, streams included), and a model in use is never unloaded. The model preloaded from the
command line is the default and stays loaded.

A model's memory is what the engine's own planning says before it allocates anything: the weights as they will be held
plus the KV block pool (hearth/engine/model_runner.py `plan_memory`), so the budget check runs before the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from hearth.api.errors import APIError
from hearth.api.protocol import ModelCard
from hearth.api.state import PrepPool, ServerState

logger = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes
DEFAULT_LOAD_TIMEOUT_S = 120.0  # how long a request waits for its model to load before a 503
CATALOG_TTL_S = 2.0  # how long a scan of the local stores is reused
FOREVER = math.inf
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

# the models a request was handed (set per HTTP request by LeaseMiddleware; routes never touch it)
_LEASES: contextvars.ContextVar[list | None] = contextvars.ContextVar("hearth_model_leases", default=None)


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a keep_alive value as Ollama accepts it: a number of seconds or a duration string ("10m", "1h30m",
    "90s", "300"); 0 unloads at once, a negative value means forever (math.inf). None stays None. ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '10m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_RE.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive {value!r} is not a number of seconds or a duration such as '10m'") from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration such as '10m'")
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number")
    return FOREVER if seconds < 0 else seconds


class ModelSource(Protocol):
    """Where a registry finds, sizes and loads models (the local stores in `hearth serve`; tests hand their own)."""

    processor: str  # "cpu" or "cuda", for `hearth ps`

    def catalog(self) -> dict[str, Any]:
        """Served name → what `estimate` and `load` take, for every model that can be served."""
        ...

    def estimate(self, ref: Any) -> int:
        """Bytes the model will hold once loaded; raises (ValueError, ModelLoadError, OSError) when it cannot load."""
        ...

    def load(self, ref: Any, name: str) -> tuple[Any, Any, Any]:
        """(engine, tokenizer, chat template or None), blocking; the engine is not started yet."""
        ...


class LocalModels:
    """The models on this machine (`hearth list`), each loaded as `hearth serve MODEL` would load it."""

    def __init__(self, engine_config: Any = None, device: str = "cpu") -> None:
        self.engine_config = engine_config
        self.device = device
        self.processor = "cuda" if device.startswith("cuda") else "cpu"

    def catalog(self) -> dict[str, Any]:
        from hearth.loader.resolve import ModelRef, local_models

        out: dict[str, Any] = {}
        for row in local_models():
            name = row["name"]
            if row["kind"] in ("gguf", "hf"):  # a file or folder under $HEARTH_HOME/models: served by its base name
                name = ModelRef(name, row["path"], "gguf").name
            out.setdefault(name, row["name"])
        return out

    def _ref(self, ref: Any) -> Any:
        from hearth.loader.resolve import resolve_model

        return resolve_model(ref) if isinstance(ref, str) else ref

    def estimate(self, ref: Any) -> int:
        import torch

        from hearth.config import EngineConfig
        from hearth.engine.model_runner import available_memory, plan_memory, resolve_dtype
        from hearth.loader.inspect import read_gguf_config, read_hf_config
        from hearth.loader.load import checkpoint_weight_bytes

        ref = self._ref(ref)
        engine_config = self.engine_config or EngineConfig()
        config = read_gguf_config(ref.path) if ref.format == "gguf" else read_hf_config(ref.path)
        dtype = resolve_dtype(engine_config.dtype, ref, config)
        keep_quantized = dtype != torch.float32
        plan = plan_memory(ref, config, engine_config, dtype, keep_quantized, available_memory(torch.device(self.device)))
        return checkpoint_weight_bytes(ref, keep_quantized, torch.finfo(dtype).bits // 8) + plan.num_blocks * plan.block_bytes

    def load(self, ref: Any, name: str) -> tuple[Any, Any, Any]:
        from hearth.chat.template import load_chat_template
        from hearth.engine.async_engine import AsyncEngine
        from hearth.tokenizer import load_tokenizer

        ref = self._ref(ref)
        tokenizer = load_tokenizer(ref.path)
        engine = AsyncEngine.from_model(ref, self.engine_config, device=self.device, tokenizer=tokenizer)
        return engine, tokenizer, load_chat_template(tokenizer)


def chatml_if_none(tokenizer: Any, chat_template: Any) -> Any:
    """The model's template, or ChatML for a model that has none."""
    if chat_template is not None:
        return chat_template
    from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate

    return ChatTemplate(CHATML_TEMPLATE, getattr(tokenizer, "bos_token", None) or "",
                        getattr(tokenizer, "eos_token", None) or "")  # fmt: skip


def release_memory() -> None:
    """Collect what an unloaded engine left and hand freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    from hearth.engine.model_runner import release_freed_memory

    release_freed_memory()


async def in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """`fn()` in a daemon thread (so that stopping the server never waits for a load); its result or exception."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="hearth-load", daemon=True).start()
    return await done


@dataclass(eq=False)
class Served:
    """One model the server knows about: loading, loaded, or the preloaded default."""

    name: str
    ref: Any
    keep_alive: float
    state: ServerState | None = None
    task: asyncio.Task | None = None
    size: int = 0
    pinned: bool = False  # the preloaded default: never unloaded
    leases: int = 0  # requests holding it
    phase: str = "loading"  # while it loads: "planning", "waiting for memory", "loading"
    last_used: float = field(default_factory=time.monotonic)

    def expires_at(self, now: float) -> float:
        """Monotonic time it unloads if nothing uses it meanwhile (inf: never)."""
        if self.pinned or self.keep_alive == FOREVER:
            return FOREVER
        return (now if self.leases else self.last_used) + self.keep_alive


class ModelLoadFailed(Exception):
    pass


class ModelRegistry:
    """The served models: lookup by name, load on first use, keep-alive and LRU unloading (see the module docstring)."""

    def __init__(self, source: ModelSource | None = None, *, keep_alive: float = DEFAULT_KEEP_ALIVE_S,
                 budget_bytes: int | None = None, load_timeout: float = DEFAULT_LOAD_TIMEOUT_S,
                 metrics: Any = None, prep: PrepPool | None = None) -> None:  # fmt: skip
        self.source = source
        self.keep_alive = keep_alive
        self.budget_bytes = budget_bytes
        self.load_timeout = load_timeout
        self.metrics = metrics
        self.prep = prep or PrepPool()
        self.default: str | None = None
        self._entries: dict[str, Served] = {}
        self._closing: dict[Served, asyncio.Task] = {}  # unloads in progress (their memory still counts)
        self._catalog: dict[str, Any] = {}
        self._catalog_time = -math.inf
        self._changed = asyncio.Event()  # set (and replaced) whenever memory is freed or a lease ends
        self._reaper: asyncio.Task | None = None

    # --- the default model (preloaded by `hearth serve MODEL`, or the one engine of `create_app`)

    def add_default(self, name: str, engine: Any, tokenizer: Any, chat_template: Any, metrics: Any,
                    reasoning_parser: str | None = None, tool_parser: str | None = None) -> ServerState:  # fmt: skip
        state = ServerState(engine, tokenizer, chatml_if_none(tokenizer, chat_template), name, metrics, reasoning_parser,
                            tool_parser, prep=self.prep, models=self)  # fmt: skip
        self._entries[name] = Served(name, None, FOREVER, state=state, pinned=True)
        self.default = name
        return state

    # --- lookups

    async def catalog(self) -> dict[str, Any]:
        """Servable names (the local stores, rescanned at most every CATALOG_TTL_S), the default first."""
        now = time.monotonic()
        if self.source is not None and now - self._catalog_time > CATALOG_TTL_S:
            try:
                self._catalog = await asyncio.to_thread(self.source.catalog)
            except Exception as e:  # a store that cannot be read must not take the model list down
                logger.warning("could not list the local models: %s", e)
            self._catalog_time = now
        return self._catalog

    async def names(self) -> list[str]:
        catalog = await self.catalog()
        pinned = [n for n, e in self._entries.items() if e.pinned]
        return pinned + sorted(n for n in set(catalog) | set(self._entries) if n not in pinned)

    def loaded(self) -> list[Served]:
        """Models whose engine is up, most recently used first."""
        out = [e for e in self._entries.values() if e.state is not None]
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def entry(self, name: str) -> Served | None:
        return self._entries.get(name)

    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values()) + sum(e.size for e in self._closing)

    async def model_cards(self) -> list[ModelCard]:
        cards = []
        for name in await self.names():
            e = self._entries.get(name)
            if e is not None and e.state is not None:
                card = e.state.model_card()
                if self.source is not None:
                    card.loaded = e.state.engine.state == "ready"
            else:
                card = ModelCard(id=name, loaded=False)
            cards.append(card)
        return cards

    # --- the accessor

    async def get(self, name: str | None, keep_alive: Any = None) -> ServerState:
        """The state of `name` (None: the default), loading it if needed; APIError 404 when the server has no such
        model, 400 when it cannot load, 503 when it does not load within the load timeout or is not ready."""
        try:
            seconds = parse_keep_alive(keep_alive)
        except ValueError as e:
            raise APIError(str(e), 400, "keep_alive") from None
        if name is None:
            if self.default is None:
                raise APIError("this server serves several models: name one in `model` (GET /v1/models lists them)", 400,
                               "model")  # fmt: skip
            name = self.default
        entry = self._entries.get(name)
        if entry is None:
            catalog = await self.catalog()
            if name not in catalog and time.monotonic() - self._catalog_time > 0.2:  # pulled since the last scan?
                catalog = await self._rescan()
            if name not in catalog:
                raise self.not_found(name)
            entry = self._entries.get(name)  # another request may have started it meanwhile
            if entry is None:
                entry = Served(name, catalog[name], self.keep_alive)
                self._entries[name] = entry
                entry.task = asyncio.create_task(self._load(entry))
                entry.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by waiters
        self._lease(entry, seconds)
        if entry.state is None:
            assert entry.task is not None
            try:
                await asyncio.wait_for(asyncio.shield(entry.task), self.load_timeout)
            except TimeoutError:
                if entry.phase == "waiting for memory":
                    message = (f"no memory for the model {name!r} yet: the loaded models in use hold the server's "
                               "memory budget (--max-memory); retry shortly")  # fmt: skip
                else:
                    message = f"the model {name!r} is still {entry.phase} after {self.load_timeout:.0f} s; retry shortly"
                raise APIError(message, 503, "model", "model_loading") from None
            except ModelLoadFailed as e:
                raise APIError(f"the model {name!r} could not be loaded: {e}", 400, "model", "model_load_failed") from None
        state = entry.state
        assert state is not None
        if state.engine.state == "dead" and not entry.pinned and entry.leases <= 1:  # load it afresh
            logger.warning("the engine of %s stopped after an internal error; reloading it", name)
            self._unlease(entry)
            await self._unload(entry)
            return await self.get(name, keep_alive)
        state.check_ready()
        return state

    def not_found(self, name: str) -> APIError:
        listed = ", ".join(repr(n) for n in list(self._entries)[:3])
        hint = f"this server serves {listed}" if self.source is None else "GET /v1/models lists what it serves"
        return APIError(f"the model {name!r} does not exist; {hint}", 404, "model", "model_not_found")

    async def _rescan(self) -> dict[str, Any]:
        self._catalog_time = -math.inf
        return await self.catalog()

    def _lease(self, entry: Served, keep_alive: float | None) -> None:
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        entry.last_used = time.monotonic()
        leases = _LEASES.get()
        if leases is not None:  # released by LeaseMiddleware once the response is sent
            entry.leases += 1
            leases.append(entry)

    def _unlease(self, entry: Served) -> None:
        leases = _LEASES.get()
        if leases is not None and entry in leases:
            leases.remove(entry)
            entry.leases -= 1

    def release(self, entries: list[Served]) -> None:
        now = time.monotonic()
        for entry in entries:
            entry.leases -= 1
            entry.last_used = now
        self._wake()

    # --- loading and unloading

    async def _load(self, entry: Served) -> None:
        assert self.source is not None
        start = time.perf_counter()
        try:
            entry.phase = "planning"
            try:
                size = await asyncio.to_thread(self.source.estimate, entry.ref)
            except Exception as e:
                raise ModelLoadFailed(str(e)) from e
            entry.phase = "waiting for memory"
            await self._make_room(entry, size)
            entry.size = size
            entry.phase = "loading"
            try:
                engine, tokenizer, template = await in_daemon_thread(lambda: self.source.load(entry.ref, entry.name))
                await engine.start()
            except Exception as e:
                raise ModelLoadFailed(str(e)) from e
        except BaseException as e:
            if self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
            entry.size = 0
            self._wake()
            if not isinstance(e, asyncio.CancelledError):  # cancelled: the server is stopping
                logger.error("loading %s failed: %s", entry.name, e)
            raise
        entry.state = ServerState(engine, tokenizer, chatml_if_none(tokenizer, template), entry.name, self.metrics,
                                  prep=self.prep, models=self)  # fmt: skip
        logger.info("loaded %s in %.2f s (%.2f GiB planned)", entry.name, time.perf_counter() - start, size / 2**30)
        if self._entries.get(entry.name) is not entry:  # shut down while loading
            await self._unload(entry)

    async def _make_room(self, entry: Served, size: int) -> None:
        """Unload least recently used idle models until `size` more bytes fit the budget; 400 when the model alone is
        larger than the budget, 503 when the models in use leave no room within the load timeout."""
        budget = self.budget_bytes
        if budget is None:
            return
        if size > budget:
            raise ModelLoadFailed(f"it needs about {size / 2**30:.2f} GiB, more than the server's memory budget of "
                                  f"{budget / 2**30:.2f} GiB (--max-memory)")  # fmt: skip
        deadline = time.monotonic() + self.load_timeout
        while True:
            changed = self._changed  # taken before looking, so that no wake-up in between is missed
            if self.used_bytes() + size <= budget:
                return
            idle = [e for e in self._entries.values() if e is not entry and e.state is not None and not e.pinned
                    and e.leases == 0]  # fmt: skip
            if idle:
                victim = min(idle, key=lambda e: e.last_used)
                logger.info("unloading %s (least recently used) to make room for %s", victim.name, entry.name)
                await self._unload(victim)
                continue
            if self._closing:
                await asyncio.wait(list(self._closing.values()))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise APIError(f"no memory for {entry.name!r}: the loaded models in use hold the server's memory "
                               "budget; retry shortly", 503, "model", "model_loading")  # fmt: skip
            await self._wait(changed, remaining)

    async def _unload(self, entry: Served) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if entry.state is None or entry in self._closing:
            return
        state = entry.state
        task = asyncio.create_task(self._shutdown(entry, state))
        self._closing[entry] = task
        await asyncio.shield(task)

    async def _shutdown(self, entry: Served, state: ServerState) -> None:
        try:
            shutdown = getattr(state.engine, "shutdown", None)
            if shutdown is not None:
                await asyncio.to_thread(shutdown)
            entry.state = None
            state.engine = None
            state.tokenizer = None
            await asyncio.to_thread(release_memory)
            logger.info("unloaded %s", entry.name)
        finally:
            self._closing.pop(entry, None)
            entry.size = 0
            self._wake()

    async def unload(self, name: str) -> bool:
        """Unload a model now (not the default; not while requests use it). False when it was not loaded."""
        entry = self._entries.get(name)
        if entry is None or entry.pinned or entry.state is None or entry.leases:
            return False
        await self._unload(entry)
        return True

    # --- keep-alive

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @staticmethod
    async def _wait(changed: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    async def _reap(self) -> None:
        while True:
            changed = self._changed
            now = time.monotonic()
            wait = 60.0
            for entry in list(self._entries.values()):
                if entry.state is None or entry.leases:
                    continue
                expires = entry.expires_at(now)
                if expires <= now:
                    with contextlib.suppress(Exception):
                        logger.info("unloading %s: idle for its keep-alive", entry.name)
                        await self._unload(entry)
                else:
                    wait = min(wait, expires - now)
            await self._wait(changed, max(wait, 0.01))

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def shutdown(self) -> None:
        """Stop the reaper and every engine the registry loaded (not the default's: its owner stops it)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for entry in list(self._entries.values()):
            if entry.task is not None and not entry.task.done():
                entry.task.cancel()
            if not entry.pinned and entry.state is not None:
                await self._unload(entry)
        self._entries = {n: e for n, e in self._entries.items() if e.pinned}

    def ps(self) -> list[dict[str, Any]]:
        """The loaded models, as GET /api/ps reports them (expires_at in Unix seconds; null: never)."""
        now, wall = time.monotonic(), time.time()
        processor = self.source.processor if self.source is not None else "cpu"
        out = []
        for e in self.loaded():
            expires = e.expires_at(now)
            out.append({
                "name": e.name, "model": e.name, "size": e.size, "processor": processor,
                "state": e.state.engine.state if e.state is not None else "unloaded", "requests": e.leases,
                "expires_at": None if expires == FOREVER else wall + (expires - now),
            })  # fmt: skip
        return out


class LeaseMiddleware:
    """Holds the models a request was handed until its response has been sent (streams included), so that neither
    keep-alive nor LRU unloads a model a request is using."""

    def __init__(self, app: ASGIApp, registry: ModelRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Served] = []
        token = _LEASES.set(leases)
        try:
            await self.app(scope, receive, send)
        finally:
            _LEASES.reset(token)
            if leases:
                self.registry.release(leases)


def default_budget_bytes(device: str = "cpu") -> int:
    """The memory budget when --max-memory is not given: three quarters of the machine's RAM (of the GPU's memory on
    cuda), leaving the rest to the OS and the server itself."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.75)
    from hearth.planner.hardware import ram_bytes

    return int(ram_bytes() * 0.75)
