"""hearth/bench.py's two ways to run runtimes: side by side, or one at a time (each loaded anew every round)."""

from __future__ import annotations

import pytest

from hearth.bench import run_bench


@pytest.mark.parametrize("sequential", [False, True])
def test_run_bench_records_every_figure_either_way(sequential: bool) -> None:
    record = run_bench("smollm2", [], prompt_len=32, decode_len=8, repeat=2, threads=1, max_model_len=256,
                       sequential=sequential)  # fmt: skip
    hearth = record["hearth"]
    assert record["sequential"] is sequential
    assert hearth["prefill_tok_s"] > 0 and hearth["decode_tok_s"] > 0 and hearth["peak_rss_mb"] > 0
    assert len(hearth["prefill_spread"]["runs"]) == len(hearth["decode_spread"]["runs"]) == 2
    # a GGUF's roofline counts the file's tensors a token reads (SmolLM2: tied head, so the whole embedding too)
    assert 0.5 * hearth["weight_bytes"] < record["decode_bytes_per_token"] < 1.5 * hearth["weight_bytes"]
    if sequential:  # a load per kept round, from a warm page cache
        assert len(hearth["load_spread"]["runs"]) == 2 and hearth["load_s"] == pytest.approx(
            sorted(hearth["load_spread"]["runs"])[0] / 2 + sorted(hearth["load_spread"]["runs"])[1] / 2, abs=0.06
        )
    else:
        assert "load_spread" not in hearth and hearth["load_s"] > 0
