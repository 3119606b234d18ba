"""AsyncEngine: streams, aborts (explicit and by a consumer that goes away), duplicate ids, shutdown, the dead state,
and the admission wait it takes from the engine's policy. Most tests drive a scripted engine without a model; one runs
the real LLMEngine on a tiny checkpoint to see aborted requests give back every KV block. (Faults inside a step and
the 503s of a dead engine through the API are in test_engine_faults.py.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hearth.config import EngineConfig
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.protocol import Delta, EngineError, EngineFatalError, EngineStats, ModelInfo
from hearth.sampling_params import SamplingParams


class ScriptedEngine:
    """What AsyncEngine drives: each request gets one token per step until max_tokens; every call is recorded."""

    def __init__(self, wait_s: float = 0.0) -> None:
        self.tokenizer = None
        self.model_info = ModelInfo("scripted", 64, "ScriptedForCausalLM")
        self.stats = EngineStats()
        self.requests: dict[str, int] = {}
        self.steps: list[set[str]] = []  # the requests each step served
        self.aborted: list[str] = []
        self.wait_s = wait_s
        self.wait_asked = 0
        self.explode: BaseException | None = None
        self.go = threading.Event()  # steps produce nothing until set
        self.go.set()

    def add_request(self, prompt_ids, params, request_id):
        if not prompt_ids:
            raise EngineError("the prompt is empty", 400, "prompt")
        self.requests[request_id] = params.max_tokens

    def abort(self, request_id):
        if self.requests.pop(request_id, None) is None:
            return None
        self.aborted.append(request_id)
        return Delta(request_id, [], "", finished=True, finish_reason="abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def admission_wait_s(self) -> float:
        self.wait_asked += 1
        return self.wait_s

    def step(self) -> list[Delta]:
        if self.explode is not None:
            raise self.explode
        time.sleep(0.002)
        if not self.go.is_set():
            return []
        self.steps.append(set(self.requests))
        deltas = []
        for request_id in list(self.requests):
            self.requests[request_id] -= 1
            done = self.requests[request_id] <= 0
            if done:
                del self.requests[request_id]
            deltas.append(Delta(request_id, [7], "x", finished=done, finish_reason="length" if done else None))
        return deltas


def run(async_engine: AsyncEngine, coro_fn):
    try:
        return asyncio.run(asyncio.wait_for(coro_fn(), 30))  # bounds a hang, not a speed
    finally:
        async_engine.shutdown()


async def collect(async_engine: AsyncEngine, request_id: str, max_tokens: int = 3, prompt=(1, 2)) -> list[Delta]:
    return [d async for d in async_engine.generate(list(prompt), SamplingParams(max_tokens=max_tokens), request_id)]


def test_streams_every_delta_to_its_own_request():
    engine = ScriptedEngine()
    async_engine = AsyncEngine(engine)

    async def scenario():
        return await asyncio.gather(collect(async_engine, "a", 3), collect(async_engine, "b", 5))

    a, b = run(async_engine, scenario)
    assert [d.request_id for d in a] == ["a"] * 3 and [d.request_id for d in b] == ["b"] * 5
    assert a[-1].finished and b[-1].finish_reason == "length" and not any(d.finished for d in b[:-1])
    assert async_engine.model_info.name == "scripted"


def test_a_refused_request_raises_its_engine_error_and_others_go_on():
    engine = ScriptedEngine()
    async_engine = AsyncEngine(engine)

    async def scenario():
        return await asyncio.gather(collect(async_engine, "empty", prompt=()), collect(async_engine, "ok"),
                                    return_exceptions=True)  # fmt: skip

    refused, ok = run(async_engine, scenario)
    assert isinstance(refused, EngineError) and refused.status == 400
    assert ok[-1].finished


def test_duplicate_request_id_is_refused():
    engine = ScriptedEngine()
    engine.go.clear()
    async_engine = AsyncEngine(engine)

    async def scenario():
        first = asyncio.create_task(collect(async_engine, "same"))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineError) as e:
            await collect(async_engine, "same")
        engine.go.set()
        await first
        return e.value.status

    assert run(async_engine, scenario) == 400


def test_explicit_abort_ends_the_stream_with_abort():
    engine = ScriptedEngine()
    engine.go.clear()
    async_engine = AsyncEngine(engine)

    async def scenario():
        task = asyncio.create_task(collect(async_engine, "r", 100))
        while "r" not in engine.requests:
            await asyncio.sleep(0.01)
        await async_engine.abort("r")
        return await task

    (delta,) = run(async_engine, scenario)
    assert delta.finished and delta.finish_reason == "abort" and engine.aborted == ["r"]


def test_a_consumer_that_goes_away_aborts_its_request():
    engine = ScriptedEngine()
    async_engine = AsyncEngine(engine)

    async def scenario():
        gen = async_engine.generate([1], SamplingParams(max_tokens=1000), "gone")
        await gen.__anext__()
        await gen.aclose()
        while engine.requests:
            await asyncio.sleep(0.01)

    run(async_engine, scenario)
    assert engine.aborted == ["gone"]


def test_shutdown_stops_the_thread_without_killing_the_engine():
    engine = ScriptedEngine()
    async_engine = AsyncEngine(engine)
    async_engine.start_thread()
    thread = async_engine._thread
    async_engine.shutdown()
    assert not thread.is_alive() and async_engine.state == "ready"
    async_engine.shutdown()  # twice is harmless


@pytest.mark.parametrize("fault", [EngineFatalError("injected"), RuntimeError("injected bug")])
def test_an_escaping_error_makes_the_engine_dead(fault):
    engine = ScriptedEngine()
    engine.go.clear()
    async_engine = AsyncEngine(engine)
    deaths: list[BaseException] = []
    async_engine.on_dead = deaths.append

    async def scenario():
        waiting = asyncio.create_task(collect(async_engine, "waiting", 5))
        while "waiting" not in engine.requests:
            await asyncio.sleep(0.01)
        engine.explode = fault
        statuses = []
        for make in (lambda: waiting, lambda: asyncio.create_task(collect(async_engine, "later"))):
            with pytest.raises(EngineError) as e:
                await make()
            statuses.append(e.value.status)
        return statuses

    assert run(async_engine, scenario) == [503, 503]
    assert async_engine.state == "dead" and deaths == [fault]


def test_the_loop_waits_as_long_as_the_engine_policy_asks():
    # a policy that asks for a long wait: a request sent while another is running joins the very next step
    engine = ScriptedEngine(wait_s=5.0)
    async_engine = AsyncEngine(engine)

    async def scenario():
        first = asyncio.create_task(collect(async_engine, "first", 4))
        while not engine.wait_asked:
            await asyncio.sleep(0.01)
        steps_before = len(engine.steps)
        engine.wait_s = 0.0
        await collect(async_engine, "second", 1)
        await first
        return steps_before

    steps_before = run(async_engine, scenario)
    assert engine.steps[steps_before] == {"first", "second"}  # no step ran while the loop waited


def test_no_wait_when_the_policy_says_zero():
    engine = ScriptedEngine(wait_s=0.0)
    async_engine = AsyncEngine(engine)

    async def scenario():
        return await collect(async_engine, "r", 3)

    assert len(run(async_engine, scenario)) == 3
    assert engine.wait_asked >= 2  # asked before each step with work


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama3):
    from hearth.engine.llm_engine import LLMEngine
    from hearth.loader.resolve import resolve_model

    return LLMEngine(resolve_model(tiny_llama3[0]), EngineConfig(max_model_len=128, max_num_seqs=8, dtype="float32"))


def test_async_engine_streams_and_aborts_free_blocks(tiny_engine):
    engine = tiny_engine
    async_engine = AsyncEngine(engine)
    prompt = engine.tokenizer.encode("the river runs past the old stone city")

    async def consume(request_id, max_tokens, stop_after=None):
        chunks = []
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        gen = async_engine.generate(prompt, params, request_id)
        async for delta in gen:
            chunks.append(delta)
            if stop_after is not None and len(chunks) >= stop_after:
                await gen.aclose()  # the client goes away
                break
        return chunks

    async def scenario():
        results = await asyncio.gather(consume("full", 6), *(consume(f"gone-{i}", 50, stop_after=2) for i in range(5)))
        for _ in range(100):  # the engine thread processes the aborts
            if engine.stats.num_running == 0 and not engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        return results

    results = run(async_engine, scenario)
    full = results[0]
    assert full[-1].finished and full[-1].finish_reason == "length" and sum(len(d.token_ids) for d in full) == 6
    assert not engine.has_unfinished()
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_model_info_is_computed_once_at_construction(tiny_engine, monkeypatch):
    # the API reads model_info from the event loop on every request: it must not walk the model's modules each time
    def walk():
        raise AssertionError("model_info walked the model's modules")

    monkeypatch.setattr(tiny_engine.runner.model, "modules", walk)
    info = AsyncEngine(tiny_engine).model_info
    assert info is tiny_engine.model_info
    assert (info.max_model_len, info.architecture, info.quantization) == (128, "LlamaForCausalLM", None)
