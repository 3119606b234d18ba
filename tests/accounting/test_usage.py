"""Usage ledger and cost arithmetic: known inputs → known costs, RAPL counter handling, --since, --by, concurrency."""

from __future__ import annotations

import json
import threading
from datetime import datetime

import pytest

from hearth.accounting.usage import (
    CloudPrice,
    CostConfig,
    UsageLedger,
    UsageRecord,
    busy_seconds,
    cloud_cost,
    comparable,
    energy_j,
    load_cost_config,
    local_cost,
    read_rapl_uj,
    record,
    request_energy_j,
    summarize,
)
from hearth.cli.main import main
from hearth.cli.usage import parse_since

T0 = datetime(2025, 6, 1, 12, 0).timestamp()


def rec(model="gpt-oss-20b", key="k1", prompt=1000, cached=0, completion=1000, start=T0, duration=10.0, energy=None):
    return UsageRecord(model, key, prompt, cached, completion, 0, start, duration, energy)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))
    return tmp_path


def test_local_cost_arithmetic():
    cfg = CostConfig(watts=100, price_per_kwh=0.25, hardware_cost=3000, hardware_life_hours=10_000)
    # 100 W × 36 s = 3600 J = 1 Wh = 0.001 kWh → 0.00025; hardware 3000 / 10000 h = 0.30 per busy hour × 0.01 h
    joules = energy_j([rec(duration=36.0)], cfg.watts)
    assert joules == 3600
    assert local_cost(joules, 36.0, cfg) == pytest.approx(0.00025 + 0.003)


def test_cloud_cost_arithmetic():
    price = CloudPrice("x", input=1.0, output=4.0, cached_input=0.25)
    # 1M prompt of which 400k cached, 0.5M completion: 0.6 × 1 + 0.4 × 0.25 + 0.5 × 4 = 2.70 USD
    assert cloud_cost([rec(prompt=1_000_000, cached=400_000, completion=500_000)], price) == pytest.approx(2.70)
    assert cloud_cost([rec(prompt=1_000_000, cached=400_000, completion=0)], CloudPrice("y", 1.0, 4.0)) == 1.0
    assert cloud_cost([rec(prompt=1_000_000, completion=0)], price, usd_rate=0.9) == pytest.approx(0.9)


def test_busy_time_is_the_union_of_overlapping_requests():
    records = [rec(start=T0, duration=10), rec(start=T0 + 5, duration=10), rec(start=T0 + 100, duration=1)]
    assert busy_seconds(records) == 16
    cfg = CostConfig(watts=360, price_per_kwh=1.0)
    rows = summarize(records, cfg)
    total = rows[-1]
    assert total.group == "total" and total.busy_s == pytest.approx(16) and total.energy_wh == pytest.approx(1.6)
    assert total.local_cost == pytest.approx(0.0016)  # 1.6 Wh at 1 per kWh
    assert total.local_per_mtok == pytest.approx(0.0016 / 6000 * 1e6)


def test_rapl_energy(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("5000000\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subzone (core): not added twice
    assert read_rapl_uj(str(tmp_path)) == (5_000_000, 262143328850)
    assert read_rapl_uj(str(tmp_path / "missing")) is None
    assert request_energy_j(10_000_000, 0, interval_s=2.0, duration_s=5.0) == 10.0  # busy all interval: all of it
    assert request_energy_j(10_000_000, 0, interval_s=10.0, duration_s=2.0) == 2.0  # 1 W average × 2 s
    assert request_energy_j(-1_000_000, 3_000_000, interval_s=1.0, duration_s=1.0) == 2.0  # counter wrapped
    ledger = UsageLedger(str(tmp_path / "u.db"), rapl_root=str(tmp_path))
    (zone / "energy_uj").write_text("9000000\n")
    ledger.record("m", None, 1, 0, 1, 0, T0, 3600.0)
    assert ledger.records()[0].energy_j == pytest.approx(4.0)  # the 4 J counted since the ledger opened
    ledger.close()


def test_ledger_concurrent_inserts(home):
    ledger = UsageLedger()
    assert ledger.path == str(home / "usage.db")

    def worker(n: int) -> None:
        for i in range(25):
            ledger.record(f"m{n % 2}", f"key{n}", 10, 2, 5, 1, T0 + i, 0.5)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record(None, "other", None, 1, 0, 1, 0, T0, 0.1)  # the one-shot helper, from another connection
    rows = ledger.records()
    assert len(rows) == 8 * 25 + 1 and sum(r.prompt_tokens for r in rows) == 8 * 25 * 10 + 1
    ledger.close()


def test_comparable_endpoint_and_config_overrides(home):
    cfg = CostConfig()
    assert comparable("gpt-oss-120b", cfg).name == "groq/gpt-oss-120b"
    assert comparable("deepseek-r1-distill-llama-70b", cfg).name == "groq/deepseek-r1-distill-llama-70b"
    assert comparable("deepseek-r1", cfg).name.startswith("deepseek/deepseek-reasoner")
    assert comparable("smollm2", cfg).name == "openai/gpt-4o-mini"
    for price in cfg.cloud.values():
        assert price.date and price.source and price.output > 0
    (home / "config.toml").write_text(
        '[usage]\nwatts = 200\nprice_per_kwh = 0.5\ncurrency = "EUR"\nusd_rate = 0.9\n'
        '[usage.cloud."acme/gpt-oss-20b"]\ninput = 0.05\noutput = 0.2\ndate = "2025-10-01"\nsource = "acme.example"\n'
        'models = ["gpt-oss-20b-local"]\n[usage.cloud."openai/o4-mini"]\noutput = 5.0\n'
    )
    cfg = load_cost_config()
    assert (cfg.watts, cfg.price_per_kwh, cfg.currency, cfg.usd_rate) == (200.0, 0.5, "EUR", 0.9)
    assert cfg.cloud["openai/o4-mini"].output == 5.0 and cfg.cloud["openai/o4-mini"].input == 1.10
    assert comparable("gpt-oss-20b-local", cfg).name == "acme/gpt-oss-20b"


def test_parse_since():
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("2025-06-01") == datetime(2025, 6, 1).timestamp()
    assert parse_since("2025-06-01T00:00+00:00") == 1748736000.0
    with pytest.raises(ValueError, match="--since"):
        parse_since("last tuesday")


def test_cli_usage_since_and_by(home, capsys):
    ledger = UsageLedger()
    for day, model, key in [(0, "gpt-oss-20b", "alice"), (1, "gpt-oss-20b", "bob"), (2, "smollm2", "alice")]:
        ledger.record(model, key, 1000, 0, 1000, 0, T0 + day * 86400, 36.0)
    ledger.close()
    (home / "config.toml").write_text("[usage]\nwatts = 100\nprice_per_kwh = 1.0\n")
    assert main(["usage", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["group"]: r for r in out["rows"]}
    assert set(rows) == {"gpt-oss-20b", "smollm2", "total"}
    assert rows["gpt-oss-20b"]["requests"] == 2 and rows["total"]["energy_wh"] == pytest.approx(3.0)
    assert rows["total"]["local_cost"] == pytest.approx(0.003)  # 3 Wh at 1 per kWh
    # groq gpt-oss-20b: 1000 × 0.10 + 1000 × 0.50 per 1M = 0.0006 per request
    assert rows["gpt-oss-20b"]["cloud_cost"] == pytest.approx(0.0012)
    assert main(["usage", "--json", "--by", "key", "--since", "2025-06-02"]) == 0
    rows = {r["group"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"alice", "bob", "total"} and rows["total"]["requests"] == 2
    assert main(["usage"]) == 0
    assert "groq/gpt-oss-20b" in capsys.readouterr().out


def test_cli_usage_plot(home, capsys):
    pytest.importorskip("matplotlib")
    ledger = UsageLedger()
    for i in range(5):
        ledger.record("gpt-oss-20b", None, 2000, 0, 500, 0, T0 + i * 600, 20.0)
    ledger.close()
    png = home / "cost.png"
    assert main(["usage", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
