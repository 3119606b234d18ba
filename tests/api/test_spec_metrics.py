"""/metrics: gauges summed over the loaded engines, speculative draft and kept tokens counted from each engine's
running totals."""

from __future__ import annotations

from hearth.api.metrics import Metrics
from hearth.engine.protocol import EngineStats


def value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name)


def test_speculative_counters_follow_the_engine_totals():
    metrics = Metrics()
    metrics.update_engines({"a": EngineStats(num_draft_tokens=10, num_accepted_tokens=7)})
    metrics.update_engines({"a": EngineStats(num_draft_tokens=10, num_accepted_tokens=7)})  # no new drafts: no change
    metrics.update_engines({"a": EngineStats(num_draft_tokens=16, num_accepted_tokens=9)})
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 16
    assert value(metrics, "hearth_spec_decode_num_accepted_tokens_total") == 9
    metrics.update_engines({"a": EngineStats(num_draft_tokens=3, num_accepted_tokens=1)})  # totals went back: from 0
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 19
    assert value(metrics, "hearth_spec_decode_num_accepted_tokens_total") == 10
    assert b"hearth_spec_decode_num_accepted_tokens_total 10.0" in metrics.render()


def test_several_engines_count_apart():
    """Each engine's totals are its own: a second engine adds its drafts, an unloaded one takes nothing back, and a
    reloaded model (a new engine under a new key) counts from 0."""
    metrics = Metrics()
    a, b = EngineStats(num_draft_tokens=10, num_accepted_tokens=6), EngineStats(num_draft_tokens=4, num_accepted_tokens=2)
    metrics.update_engines({"a": a, "b": b})
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 14
    metrics.update_engines({"b": EngineStats(num_draft_tokens=5, num_accepted_tokens=3)})  # a unloaded
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 15
    assert value(metrics, "hearth_spec_decode_num_accepted_tokens_total") == 9
    metrics.update_engines({"a2": EngineStats(num_draft_tokens=12, num_accepted_tokens=1),
                            "b": EngineStats(num_draft_tokens=5, num_accepted_tokens=3)})  # fmt: skip
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 27


def test_gauges_sum_the_engines():
    metrics = Metrics()
    metrics.update_engines({"a": EngineStats(num_running=2, num_waiting=1, kv_cache_usage=0.5, num_kvcache_blocks=100),
                            "b": EngineStats(num_running=1, kv_cache_usage=1.0, num_kvcache_blocks=300)})  # fmt: skip
    assert value(metrics, "hearth_num_requests_running") == 3
    assert value(metrics, "hearth_num_requests_waiting") == 1
    assert value(metrics, "hearth_num_kvcache_blocks") == 400
    assert value(metrics, "hearth_kv_cache_usage_ratio") == (50 + 300) / 400
    metrics.update_engines({})
    assert value(metrics, "hearth_num_kvcache_blocks") == 0 and value(metrics, "hearth_kv_cache_usage_ratio") == 0
