"""LoadingEngine without the app: "loading" until the load returns, then the loaded engine's state, model info and
streams; "failed" when the load raises; the engine dying later reaches the same failure callback. (Through the HTTP app:
test_api_fake.py::test_serve_loading_engine_states.)"""

from __future__ import annotations

import asyncio
import threading

from hearth.engine.loading import LoadingEngine
from hearth.engine.protocol import Delta, EngineStats, ModelInfo


class Loaded:
    """A loaded engine as LoadingEngine sees it."""

    def __init__(self) -> None:
        self.state = "ready"
        self.model_info = ModelInfo("loaded", 32, "LoadedForCausalLM")
        self.stats = EngineStats(num_running=1)
        self.started = self.stopped = False
        self.aborted: list[str] = []
        self.on_dead = None

    async def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, prompt_ids, params, request_id):
        yield Delta(request_id, [1], "a", finished=True, finish_reason="stop")


async def until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_loading_then_ready_then_forwarding():
    gate, loaded = threading.Event(), Loaded()

    def load():
        gate.wait(10)
        return loaded

    engine = LoadingEngine(load, on_failure=lambda e: None)

    async def scenario():
        await engine.start()
        assert engine.state == "loading" and engine.stats == EngineStats()
        await engine.abort("early")  # nothing loaded yet: nothing to abort
        gate.set()
        await until(lambda: engine.state == "ready")
        assert loaded.started and loaded.on_dead is not None  # the loaded engine's death stops the server too
        assert engine.model_info.name == "loaded" and engine.stats.num_running == 1
        deltas = [d async for d in engine.generate([1], None, "r")]
        await engine.abort("late")
        return deltas

    deltas = asyncio.run(scenario())
    assert [d.text for d in deltas] == ["a"] and loaded.aborted == ["late"]
    engine.shutdown()
    assert loaded.stopped


def test_a_load_that_raises_is_failed_and_reported():
    failures: list[BaseException] = []

    def load():
        raise OSError("weights missing")

    engine = LoadingEngine(load, failures.append)

    async def scenario():
        await engine.start()
        await until(lambda: engine.state == "failed")

    asyncio.run(scenario())
    assert isinstance(failures[0], OSError) and engine.stats == EngineStats()
    engine.shutdown()
