"""/metrics counts speculative draft tokens and kept ones from the engine's running totals."""

from __future__ import annotations

from hearth.api.metrics import Metrics
from hearth.engine.protocol import EngineStats


def value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name)


def test_speculative_counters_follow_the_engine_totals():
    metrics = Metrics()
    metrics.update_engine(EngineStats(num_draft_tokens=10, num_accepted_tokens=7))
    metrics.update_engine(EngineStats(num_draft_tokens=10, num_accepted_tokens=7))  # no new drafts: no change
    metrics.update_engine(EngineStats(num_draft_tokens=16, num_accepted_tokens=9))
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 16
    assert value(metrics, "hearth_spec_decode_num_accepted_tokens_total") == 9
    metrics.update_engine(EngineStats(num_draft_tokens=3, num_accepted_tokens=1))  # a new engine counts from 0
    assert value(metrics, "hearth_spec_decode_num_draft_tokens_total") == 19
    assert value(metrics, "hearth_spec_decode_num_accepted_tokens_total") == 10
    assert b"hearth_spec_decode_num_accepted_tokens_total 10.0" in metrics.render()
