"""One request must not kill or poison the engine.

Sampling parameters are validated to what the sampler computes with (generated extremes for every field, run through
the real sampler); a fault injected in a step fails only the request that caused it, the others finish with the
tokens they produce without it and every KV block comes back; a dead engine thread answers 503 at once, /health says
so, and `hearth serve` exits non-zero.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hearth.config import EngineConfig
from hearth.engine.async_engine import AsyncEngine
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.protocol import Delta, EngineError, EngineFatalError, EngineStats, ModelInfo
from hearth.layers.sampler import Sampler
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import GREEDY_TEMPERATURE, SamplingParams

# --- parameters: generated extremes ---------------------------------------------------------------------------------

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
INT_FIELDS = ("top_k", "max_tokens", "seed", "logprobs")
EXTREME_FLOATS = [0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e-45, 1e-40, 1e-38, 9.99e-6, 1e-5, 1e-3, 0.5, 1.0, 1.0 - 1e-16,
                  1.0000001, 2.0, 100.0, 1e4, 1e4 + 1, 3.4e38, 3.5e38, 1e300, 1.7976931348623157e308, math.inf,
                  -math.inf, math.nan, -5e-324, -1e-300, -2.0, -1e300]  # fmt: skip
EXTREME_INTS = [0, 1, -1, 2, 20, 21, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30,
                -(10**30), 10**400, -(10**400)]  # fmt: skip

float_values = st.one_of(
    st.sampled_from(EXTREME_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.floats(min_value=0, max_value=1e-30, allow_subnormal=True),
    st.floats(min_value=0, max_value=2),
    st.sampled_from(EXTREME_INTS),
)
int_values = st.one_of(
    st.sampled_from(EXTREME_INTS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.sampled_from([0.5, 1.0, math.nan, math.inf, 1e300]),
)
# one or two fields at a time, so that one refused value does not hide what another does to the sampler
params_kwargs = st.builds(
    lambda fields, stop_token_ids: {**fields, "stop_token_ids": stop_token_ids},
    st.lists(st.sampled_from(FLOAT_FIELDS + INT_FIELDS), min_size=1, max_size=2, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: float_values if n in FLOAT_FIELDS else int_values for n in names})
    ),
    st.lists(st.one_of(st.sampled_from(EXTREME_INTS), st.integers()), max_size=3),
)


def fake_seq(params: SamplingParams, vocab: int, rng: torch.Generator) -> SimpleNamespace:
    """What the sampler reads from a Sequence: its params, token ids and prompt length."""
    ids = torch.randint(0, vocab, (12,), generator=rng).tolist()
    return SimpleNamespace(params=params, token_ids=ids, num_prompt_tokens=6)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=params_kwargs, scale=st.sampled_from([0.0, 1.0, 30.0, 1e4, 1e36]), data_seed=st.integers(0, 2**32 - 1))
def test_params_are_refused_or_sampled_without_error(kwargs, scale, data_seed):
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        assert str(e)  # a message for the 400
        return
    for name in FLOAT_FIELDS:
        assert math.isfinite(getattr(params, name)), name
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)  # what the engine does at admission
    else:
        generator = None
    vocab = 64
    rng = torch.Generator().manual_seed(data_seed)
    logits = torch.randn(3, vocab, generator=rng) * scale
    logits[2, : vocab // 2] = float("-inf")  # a model may mask tokens out entirely
    seqs = [fake_seq(params, vocab, rng), fake_seq(SamplingParams(), vocab, rng), fake_seq(params, vocab, rng)]
    token_ids, logprobs = Sampler(seed=0)(logits, seqs, [generator, None, None])
    assert len(token_ids) == 3 and all(0 <= t < vocab for t in token_ids)
    for i, t in enumerate(token_ids):
        assert logits[i, t] > float("-inf")  # never a masked token
    if params.is_greedy and params.repetition_penalty == 1 and not (params.presence_penalty or params.frequency_penalty):
        assert token_ids[0] == int(logits[0].argmax())
    for lp in logprobs:
        if lp is not None:
            assert math.isfinite(lp.logprob) and all(math.isfinite(v) for _, v in lp.top)


REFUSED = [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 10**30), ("seed", 2**20000), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", 10**400), ("top_p", math.nan), ("top_p", 0.0), ("min_p", math.nan),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 5e-324), ("repetition_penalty", 1e-40),
    ("repetition_penalty", math.inf), ("presence_penalty", math.nan), ("top_k", 1.5), ("logprobs", True),
]  # fmt: skip


# ids by position: str() of a huge int is refused by Python itself
@pytest.mark.parametrize("field, value", REFUSED, ids=[f"{field}-{i}" for i, (field, _) in enumerate(REFUSED)])
def test_values_the_sampler_cannot_use_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_tiny_positive_values_sample_what_they_mean():
    seeds = (2**64 - 1, -(2**63))
    for seed in seeds:  # the ends of what torch accepts
        torch.Generator().manual_seed(SamplingParams(seed=seed).seed)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 5
    top = int(logits[0].argmax())
    for kwargs in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-40},
                   {"temperature": 0.7, "top_p": 5e-324}, {"temperature": 0.7, "top_p": 1e-300},
                   {"temperature": 0.7, "top_p": 1e-40}, {"temperature": 1.0, "min_p": 1.0}):  # fmt: skip
        params = SamplingParams(**kwargs)
        seq = SimpleNamespace(params=params, token_ids=[1, 2], num_prompt_tokens=2)
        for draw in range(5):
            token_ids, _ = Sampler(seed=draw)(logits, [seq], [None])
            assert token_ids == [top], kwargs
    assert SamplingParams(temperature=GREEDY_TEMPERATURE * 0.99).is_greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).is_greedy


def test_logits_near_float32_max_stay_finite_through_penalties_and_temperature():
    logits = torch.full((1, 16), -3e38)
    logits[0, 3], logits[0, 7], logits[0, 9] = 3e38, 2e38, float("-inf")
    params = SamplingParams(temperature=1e-5, repetition_penalty=0.01, top_p=0.5, min_p=0.1, frequency_penalty=-2)
    seq = SimpleNamespace(params=params, token_ids=[3, 7, 9, 1, 3, 7], num_prompt_tokens=2)
    for draw in range(5):
        token_ids, _ = Sampler(seed=draw)(logits, [seq], [None])
        assert token_ids[0] in (3, 7)  # the two largest, both pushed to float32's largest value


def test_non_finite_model_logits_raise_for_the_row():
    logits = torch.randn(3, 20)
    logits[1, 4] = float("nan")
    seqs = [SimpleNamespace(params=SamplingParams(temperature=0), token_ids=[1], num_prompt_tokens=1)] * 3
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        Sampler()(logits, seqs, [None] * 3)


# --- faults inside an engine step -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama3):
    # float32: batch shape cannot change a greedy choice, so retried sub-batches must reproduce the fault-free run
    return LLMEngine(resolve_model(tiny_llama3[0]), EngineConfig(max_model_len=128, max_num_seqs=8,
                                                                 max_num_batched_tokens=128, dtype="float32"))  # fmt: skip


PROMPTS = ["The river runs", "Once upon a time", "A list of colors:", "In the city of", "Stones and"]


def run_all(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> dict[str, list[Delta]]:
    out: dict[str, list[Delta]] = {}
    for i, (request_id, params) in enumerate(requests):
        engine.add_request(engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), params, request_id)
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            out.setdefault(delta.request_id, []).append(delta)
    assert not engine.has_unfinished()
    return out


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def batch_requests() -> list[tuple[str, SamplingParams]]:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=77, ignore_eos=True)
    return [("a", greedy), ("b", greedy), ("seeded", seeded), ("c", greedy), ("bad", greedy)]


@pytest.mark.parametrize("where", ["forward", "sampler", "detokenizer"])
@pytest.mark.parametrize("after_tokens", [0, 3])
def test_a_fault_fails_only_its_request(engine, monkeypatch, where, after_tokens):
    bm = engine.scheduler.block_manager
    expected = run_all(engine, batch_requests())
    assert bm.num_free_blocks == bm.num_blocks

    def is_bad(seq) -> bool:
        return seq.request_id == "bad" and seq.num_output_tokens >= after_tokens

    steps_with_bad = []
    if where == "forward":
        run = engine.runner.run

        def faulty_run(batch):
            if any(is_bad(s) for s in batch.seqs):
                steps_with_bad.append(len(batch.seqs))
                raise RuntimeError("injected forward fault")
            return run(batch)

        monkeypatch.setattr(engine.runner, "run", faulty_run)
    elif where == "sampler":
        sampler = engine.runner.sampler

        class FaultySampler:
            generator = sampler.generator

            def __call__(self, logits, seqs, generators):
                if any(is_bad(s) for s in seqs):
                    steps_with_bad.append(len(seqs))
                    # draw for the others first, as a sampler that fails on the last row would
                    sampler(logits[:-1], seqs[:-1], generators[:-1])
                    raise ValueError("injected sampler fault")
                return sampler(logits, seqs, generators)

        monkeypatch.setattr(engine.runner, "sampler", FaultySampler())
    else:
        output = engine._output

        def faulty_output(seq, token_id, lp):
            if seq.request_id == "bad" and seq.num_output_tokens > after_tokens:
                steps_with_bad.append(1)
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
            return output(seq, token_id, lp)

        monkeypatch.setattr(engine, "_output", faulty_output)

    got = run_all(engine, [(f"{rid}", params) for rid, params in batch_requests()])
    assert steps_with_bad and (where == "detokenizer" or max(steps_with_bad) > 1)  # it was batched with others
    bad = got["bad"][-1]
    assert bad.finished and bad.finish_reason == "error"
    assert isinstance(bad.error, EngineError) and bad.error.status == 500
    assert tokens(got["bad"]) == tokens(expected["bad"])[:after_tokens]  # what it produced before the fault
    for rid in ("a", "b", "seeded", "c"):
        assert tokens(got[rid]) == tokens(expected[rid]), rid
        assert got[rid][-1].finish_reason == "length"
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.seqs and not engine.detokenizers


def test_a_fault_every_sequence_hits_is_fatal(engine, monkeypatch):
    def broken(batch):
        raise RuntimeError("injected: the runner is broken")

    params = SamplingParams(temperature=0, max_tokens=4)
    monkeypatch.setattr(engine.runner, "run", broken)
    engine.add_request(engine.tokenizer.encode(PROMPTS[0]), params, "alone")
    (delta,) = engine.step()  # one sequence: it fails, the engine goes on
    assert delta.finish_reason == "error" and not engine.has_unfinished()
    for i in range(2):
        engine.add_request(engine.tokenizer.encode(PROMPTS[i]), params, f"together-{i}")
    with pytest.raises(EngineFatalError):
        engine.step()
    for i in range(2):
        engine.abort(f"together-{i}")
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_async_engine_fails_only_the_faulty_request(engine, monkeypatch):
    run = engine.runner.run

    def faulty_run(batch):
        if any(s.request_id == "bad" for s in batch.seqs):
            raise RuntimeError("injected forward fault")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", faulty_run)
    async_engine = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def consume(request_id, prompt):
        deltas = []
        async for delta in async_engine.generate(engine.tokenizer.encode(prompt), params, request_id):
            deltas.append(delta)
        return deltas

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(consume("good", PROMPTS[0]), consume("bad", PROMPTS[1]),
                                                     return_exceptions=True), 120)  # fmt: skip

    try:
        good, bad = asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    assert isinstance(bad, EngineError) and bad.status == 500
    assert good[-1].finish_reason == "length" and len(tokens(good)) == 5
    assert async_engine.state == "ready"
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


# --- a dead engine thread -------------------------------------------------------------------------------------------


class StubLLMEngine:
    """What AsyncEngine drives, without a model: a request gets one token per step; `explode` makes step raise."""

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(bos_token="<s>", eos_token="</s>", eos_token_ids=[2],
                                         decode=lambda ids, skip_special_tokens=True: "x" * len(ids))  # fmt: skip
        self.model_info = ModelInfo("stub", 64, "StubForCausalLM")
        self.stats = EngineStats()
        self.requests: dict[str, int] = {}
        self.hold = threading.Event()  # while clear, requests wait without producing tokens
        self.explode: BaseException | None = None

    def add_request(self, prompt_ids, params, request_id):
        self.requests[request_id] = params.max_tokens

    def abort(self, request_id):
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def admission_wait_s(self) -> float:
        return 0.0

    def step(self) -> list[Delta]:
        if self.explode is not None:
            raise self.explode
        time.sleep(0.005)
        if not self.hold.is_set():
            return []
        deltas = []
        for request_id in list(self.requests):
            self.requests[request_id] -= 1
            done = self.requests[request_id] <= 0
            if done:
                del self.requests[request_id]
            deltas.append(Delta(request_id, [5], "x", finished=done, finish_reason="length" if done else None))
        return deltas


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("fault", [RuntimeError("injected bug"), EngineFatalError("injected fatal")])
def test_dead_engine_answers_503_and_health_says_so(fault):
    from hearth.api.app import create_app

    stub = StubLLMEngine()
    async_engine = AsyncEngine(stub)
    deaths: list[BaseException] = []
    async_engine.on_dead = deaths.append
    app = create_app(async_engine, stub.tokenizer, None, "stub")
    body = {"model": "stub", "prompt": [7, 8, 9], "max_tokens": 3}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hearth") as client:
            assert (await client.get("/health")).status_code == 200
            stub.hold.set()
            ok = await asyncio.wait_for(client.post("/v1/completions", json=body), 10)
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
            stub.hold.clear()
            pending = [asyncio.create_task(client.post("/v1/completions", json={**body, "stream": stream}))
                       for stream in (False, True)]  # fmt: skip
            await asyncio.to_thread(wait_until, lambda: len(stub.requests) == 2)
            stub.explode = fault
            answers = await asyncio.wait_for(asyncio.gather(*pending), 10)  # bounds a hang, not a speed
            later = await asyncio.wait_for(client.post("/v1/completions", json=body), 10)
            health = await client.get("/health")
            return answers + [later], health

    try:
        responses, health = asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    for r in responses:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "service_unavailable" and "restart" in error["message"]
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert async_engine.state == "dead" and deaths == [fault]


def test_generate_on_a_dead_engine_fails_at_once_and_never_hangs():
    stub = StubLLMEngine()
    async_engine = AsyncEngine(stub)

    async def consume(request_id):
        async for _ in async_engine.generate([1, 2], SamplingParams(max_tokens=3), request_id):
            pass

    async def scenario():
        waiting = asyncio.create_task(consume("waiting"))
        await asyncio.to_thread(wait_until, lambda: "waiting" in stub.requests)
        # the thread ends without _die (as if it were killed): waiting streams notice on their next poll
        async_engine._stopping = True
        async_engine._inbox.put(("stop", None))
        await asyncio.to_thread(async_engine._thread.join, 5)
        async_engine._stopping = False
        assert async_engine.state == "dead"
        results = []
        for task in (waiting, asyncio.create_task(consume("later"))):
            with pytest.raises(EngineError) as e:
                await asyncio.wait_for(task, 5)
            results.append(e.value.status)
        return results

    try:
        assert asyncio.run(scenario()) == [503, 503]
    finally:
        async_engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = textwrap.dedent("""
    import sys

    from hearth.engine.llm_engine import LLMEngine

    def step(self):
        raise RuntimeError("injected fault in the engine loop")

    LLMEngine.step = step  # every step raises: the engine thread dies on the first request

    from hearth.cli.main import main

    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_serve_exits_non_zero_when_the_engine_dies(tmp_path):
    port = free_port()
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "HEARTH_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.Popen([sys.executable, str(launcher), "serve", "smollm2", "--port", str(port),
                             "--max-model-len", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True, cwd=repo)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the server did not become ready"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            r = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        code = proc.wait(timeout=30)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("hearth: error:") and "supervisor" in last
