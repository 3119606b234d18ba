"""Usage ledger (SQLite under $HEARTH_HOME/usage.db) and what it costs: energy (Intel RAPL, else watts × busy time),
money (electricity + hardware amortised over its life) and the same traffic at dated cloud API prices."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace

from hearth.config import hearth_home

logger = logging.getLogger(__name__)

RAPL_ROOT = "/sys/class/powercap"
SCHEMA = """CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, model TEXT NOT NULL, key_id TEXT, prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    started_at REAL NOT NULL, duration_s REAL NOT NULL, energy_j REAL)"""
COLUMNS = ("model", "key_id", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "started_at",
           "duration_s", "energy_j")  # fmt: skip


@dataclass(slots=True)
class UsageRecord:
    model: str
    key_id: str | None
    prompt_tokens: int  # includes cached_tokens
    cached_tokens: int
    completion_tokens: int  # includes reasoning_tokens (OpenAI's accounting)
    reasoning_tokens: int
    started_at: float  # unix seconds
    duration_s: float
    energy_j: float | None = None  # measured (RAPL) when it was readable at record time


def default_ledger_path() -> str:
    return os.path.join(hearth_home(), "usage.db")


# --- energy -------------------------------------------------------------------------------------------------------


def read_rapl_uj(root: str = RAPL_ROOT) -> tuple[int, int] | None:
    """(µJ summed over CPU packages, their wrap range in µJ) from Intel RAPL; None when unreadable (often root-only)."""
    total = wrap = 0
    try:
        zones = [z for z in os.listdir(root) if z.startswith("intel-rapl:") and z.count(":") == 1]
        for zone in zones:
            with open(os.path.join(root, zone, "energy_uj"), encoding="ascii") as f:
                total += int(f.read())
            with open(os.path.join(root, zone, "max_energy_range_uj"), encoding="ascii") as f:
                wrap += int(f.read())
    except (OSError, ValueError):
        return None
    return (total, wrap) if zones else None


def request_energy_j(delta_uj: int, wrap_uj: int, interval_s: float, duration_s: float) -> float:
    """A request's energy from the RAPL counter delta since the previous reading `interval_s` ago: all of it when the
    request covered the interval (back-to-back or overlapping requests), else average power × the request's
    duration, so idle time between requests is not charged to it."""
    if delta_uj < 0:  # the counter wrapped
        delta_uj += wrap_uj
    joules = delta_uj / 1e6
    if interval_s <= 0:
        return 0.0
    return joules * min(1.0, duration_s / interval_s)


# --- the ledger ---------------------------------------------------------------------------------------------------


class UsageLedger:
    """Append-only request ledger. `record` is thread-safe (one connection behind a lock; WAL so other processes, such
    as `hearth usage`, read while the server writes)."""

    def __init__(self, path: str | None = None, rapl_root: str = RAPL_ROOT):
        self.path = path or default_ledger_path()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(SCHEMA)
        self._rapl_root = rapl_root
        reading = read_rapl_uj(rapl_root)
        self._last_rapl = (time.time(), reading) if reading else None

    def record(self, model: str, key_id: str | None, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
               reasoning_tokens: int, started_at: float, duration_s: float) -> None:  # fmt: skip
        """Add one finished request. Called from any server thread."""
        with self._lock:
            energy = None
            if self._last_rapl is not None:
                now, reading = time.time(), read_rapl_uj(self._rapl_root)
                if reading is not None:
                    (then, (before, _)), (after, wrap) = self._last_rapl, reading
                    energy = request_energy_j(after - before, wrap, now - then, duration_s)
                    self._last_rapl = (now, reading)
            row = (model, key_id, int(prompt_tokens), int(cached_tokens), int(completion_tokens), int(reasoning_tokens),
                   float(started_at), float(duration_s), energy)  # fmt: skip
            self._conn.execute(f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 9)})", row)

    def records(self, since: float | None = None) -> list[UsageRecord]:
        with self._lock:
            cur = self._conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM usage WHERE started_at >= ? ORDER BY started_at, id", (since or 0,)
            )
            return [UsageRecord(*row) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def record(ledger_path: str | None, model: str, key_id: str | None, prompt_tokens: int, cached_tokens: int,
           completion_tokens: int, reasoning_tokens: int, started_at: float, duration_s: float) -> None:  # fmt: skip
    """One-shot `UsageLedger(ledger_path).record(...)`; a long-running server should keep one UsageLedger instead."""
    ledger = UsageLedger(ledger_path)
    try:
        ledger.record(model, key_id, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, started_at,
                      duration_s)  # fmt: skip
    finally:
        ledger.close()


# --- prices and config --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CloudPrice:
    """USD per million tokens on one hosted endpoint, as published on `date` at `source`."""

    name: str
    input: float
    output: float
    cached_input: float | None = None  # None: cached prompt tokens cost the input price
    date: str = ""
    source: str = ""
    models: tuple[str, ...] = ()  # local model names this is the comparable endpoint for (substring match)


# NOTE: a snapshot, not live data: prices change often (DeepSeek cut its prices again after these dates). Override or
# extend in $HEARTH_HOME/config.toml under [usage.cloud.NAME].
CLOUD_PRICES: dict[str, CloudPrice] = {p.name: p for p in [
    CloudPrice("openai/gpt-4o-mini", 0.15, 0.60, 0.075, "2025-08", "openai.com/api/pricing", ("smollm2",)),
    CloudPrice("openai/o4-mini", 1.10, 4.40, 0.275, "2025-08", "openai.com/api/pricing", ("distill",)),
    CloudPrice("deepseek/deepseek-chat (V3)", 0.27, 1.10, 0.07, "2025-02",
               "api-docs.deepseek.com/quick_start/pricing (standard hours)", ("deepseek-v3",)),
    CloudPrice("deepseek/deepseek-reasoner (R1)", 0.55, 2.19, 0.14, "2025-02",
               "api-docs.deepseek.com/quick_start/pricing (standard hours)", ("deepseek-r1",)),
    CloudPrice("groq/gpt-oss-20b", 0.10, 0.50, None, "2025-08", "groq.com/pricing", ("gpt-oss-20b",)),
    CloudPrice("groq/gpt-oss-120b", 0.15, 0.75, None, "2025-08", "groq.com/pricing", ("gpt-oss-120b",)),
    CloudPrice("groq/deepseek-r1-distill-llama-70b", 0.75, 0.99, None, "2025-02", "groq.com/pricing",
               ("distill-llama-70b",)),
]}  # fmt: skip


@dataclass(slots=True)
class CostConfig:
    """[usage] in $HEARTH_HOME/config.toml."""

    watts: float = 65.0  # average draw while serving, used when RAPL is unreadable
    price_per_kwh: float = 0.30  # electricity, in `currency`
    currency: str = "USD"  # cloud prices are USD; set usd_rate to convert
    usd_rate: float = 1.0  # `currency` per USD
    hardware_cost: float = 0.0  # purchase price, in `currency`; 0: not amortised
    hardware_life_hours: float = 3 * 365 * 8  # busy hours over its life (3 years at 8 h/day)
    cloud: dict[str, CloudPrice] = field(default_factory=lambda: dict(CLOUD_PRICES))


def load_cost_config(path: str | None = None) -> CostConfig:
    """CostConfig with overrides from `path` (default $HEARTH_HOME/config.toml), if it exists."""
    path = path or os.path.join(hearth_home(), "config.toml")
    cfg = CostConfig()
    if not os.path.isfile(path):
        return cfg
    try:
        import tomllib
    except ImportError:  # Python 3.10
        logger.warning("cannot read %s: tomllib needs Python 3.11", path)
        return cfg
    with open(path, "rb") as f:
        section = tomllib.load(f).get("usage", {})
    for key in ("watts", "price_per_kwh", "currency", "usd_rate", "hardware_cost", "hardware_life_hours"):
        if key in section:
            setattr(cfg, key, type(getattr(cfg, key))(section[key]))
    for name, entry in section.get("cloud", {}).items():
        base = cfg.cloud.get(name, CloudPrice(name, 0.0, 0.0))
        fields = {k: v for k, v in entry.items() if k in ("input", "output", "cached_input", "date", "source")}
        if "models" in entry:
            fields["models"] = tuple(entry["models"])
        cfg.cloud[name] = replace(base, **fields)
    return cfg


# --- arithmetic ---------------------------------------------------------------------------------------------------


def busy_seconds(records: list[UsageRecord]) -> float:
    """Wall time with at least one request running: the union of [started_at, started_at + duration_s]."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((r.started_at, r.started_at + r.duration_s) for r in records):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def energy_j(records: list[UsageRecord], watts: float, overlap: float = 1.0) -> float:
    """Measured energy where the ledger has it, else `watts` × busy time (duration × `overlap`, the ledger-wide ratio
    of busy time to summed durations, so concurrent requests share the draw)."""
    return sum(r.energy_j if r.energy_j is not None else watts * r.duration_s * overlap for r in records)


def local_cost(joules: float, busy_s: float, cfg: CostConfig) -> float:
    """Electricity at price_per_kwh plus hardware_cost amortised per busy hour over hardware_life_hours."""
    electricity = joules / 3.6e6 * cfg.price_per_kwh
    hardware = busy_s / 3600 * cfg.hardware_cost / cfg.hardware_life_hours if cfg.hardware_life_hours else 0.0
    return electricity + hardware


def cloud_cost(records: list[UsageRecord], price: CloudPrice, usd_rate: float = 1.0) -> float:
    """The same tokens on a cloud endpoint: uncached prompt × input, cached × cached_input, completion × output."""
    cached_price = price.input if price.cached_input is None else price.cached_input
    usd = sum(
        (r.prompt_tokens - r.cached_tokens) * price.input + r.cached_tokens * cached_price
        + r.completion_tokens * price.output
        for r in records
    ) / 1e6  # fmt: skip
    return usd * usd_rate


def per_million(cost: float, tokens: int) -> float | None:
    return cost / tokens * 1e6 if tokens else None


def comparable(model: str, cfg: CostConfig) -> CloudPrice:
    """The cloud endpoint to set beside a local model: the longest `models` pattern found in its name, else the
    cheapest OpenAI model in the table."""
    name = model.lower()
    best = max((p for p in cfg.cloud.values() for m in p.models if m in name), default=None,
               key=lambda p: max(len(m) for m in p.models if m in name))  # fmt: skip
    return best or cfg.cloud.get("openai/gpt-4o-mini") or next(iter(cfg.cloud.values()))


@dataclass(slots=True)
class UsageRow:
    group: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    busy_s: float
    energy_wh: float
    local_cost: float
    local_per_mtok: float | None
    cloud: str
    cloud_cost: float
    cloud_per_mtok: float | None


def summarize(records: list[UsageRecord], cfg: CostConfig, by: str = "model") -> list[UsageRow]:
    """One row per model or key, plus "total". Busy time of a group is its share of the ledger-wide busy time."""
    overlap = busy_seconds(records) / (sum(r.duration_s for r in records) or 1.0)
    groups: dict[str, list[UsageRecord]] = {}
    for r in records:
        groups.setdefault((r.model if by == "model" else r.key_id) or "-", []).append(r)
    rows = []
    for name, rs in [*sorted(groups.items()), ("total", records)]:
        busy = sum(r.duration_s for r in rs) * overlap
        joules = energy_j(rs, cfg.watts, overlap)
        local = local_cost(joules, busy, cfg)
        cloud = sum(cloud_cost([r], comparable(r.model, cfg), cfg.usd_rate) for r in rs)
        names = {comparable(r.model, cfg).name for r in rs}
        tokens = sum(r.prompt_tokens + r.completion_tokens for r in rs)
        rows.append(UsageRow(
            name, len(rs), sum(r.prompt_tokens for r in rs), sum(r.cached_tokens for r in rs),
            sum(r.completion_tokens for r in rs), sum(r.reasoning_tokens for r in rs), busy, joules / 3600, local,
            per_million(local, tokens), names.pop() if len(names) == 1 else "mixed", cloud, per_million(cloud, tokens),
        ))  # fmt: skip
    return rows


def cumulative_costs(records: list[UsageRecord], cfg: CostConfig) -> list[tuple[float, float, float]]:
    """(time, cumulative local cost, cumulative comparable-cloud cost) after each request, for the plot."""
    overlap = busy_seconds(records) / (sum(r.duration_s for r in records) or 1.0)
    points, local, cloud = [], 0.0, 0.0
    for r in sorted(records, key=lambda r: r.started_at):
        local += local_cost(energy_j([r], cfg.watts, overlap), r.duration_s * overlap, cfg)
        cloud += cloud_cost([r], comparable(r.model, cfg), cfg.usd_rate)
        points.append((r.started_at + r.duration_s, local, cloud))
    return points
