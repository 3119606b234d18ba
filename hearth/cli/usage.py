"""`hearth usage`: tokens, busy time, energy and cost from the local ledger, beside dated cloud API prices."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from datetime import datetime, timezone


def register(sub) -> None:
    p = sub.add_parser("usage", help="Tokens, time, energy and cost; compare with cloud prices",
                       description="Summarise the usage ledger ($HEARTH_HOME/usage.db); prices and power from "
                                   "$HEARTH_HOME/config.toml [usage].")  # fmt: skip
    p.add_argument("--since", metavar="DATE", help="YYYY-MM-DD[THH:MM] (local time), or an age such as 7d, 12h")
    p.add_argument("--by", choices=("model", "key"), default="model", help="group rows by model or API key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write cumulative local vs cloud cost over time")
    p.set_defaults(func=cmd_usage)


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from an ISO date/time (local time unless it carries an offset) or an age (30m, 12h, 7d, 2w)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhdw])", text.strip())
    if match:
        seconds = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return (time.time() if now is None else now) - float(match.group(1)) * seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: cannot read {text!r} (try 2025-01-31, 2025-01-31T09:00 or 7d)") from None
    return when.timestamp() if when.tzinfo else when.astimezone().timestamp()


def _money(x: float | None, currency: str) -> str:
    return "-" if x is None else f"{x:,.4f} {currency}" if x < 1 else f"{x:,.2f} {currency}"


def cmd_usage(args) -> int:
    from hearth.accounting.usage import UsageLedger, cloud_cost, cumulative_costs, load_cost_config, summarize

    cfg = load_cost_config()
    since = parse_since(args.since) if args.since else None
    ledger = UsageLedger()
    try:
        records = ledger.records(since)
    finally:
        ledger.close()
    rows = summarize(records, cfg, args.by)
    cloud = [(p, cloud_cost(records, p, cfg.usd_rate)) for p in cfg.cloud.values()]
    if args.plot:
        plot(cumulative_costs(records, cfg), args.plot, cfg.currency)
    if args.json:
        out = {"since": since, "by": args.by, "currency": cfg.currency, "rows": [asdict(r) for r in rows],
               "config": {k: getattr(cfg, k) for k in ("watts", "price_per_kwh", "usd_rate", "hardware_cost",
                                                       "hardware_life_hours")},
               "cloud": [{**asdict(p), "cost_all_traffic": c} for p, c in cloud]}  # fmt: skip
        print(json.dumps(out, indent=2))
        return 0
    if not records:
        print("no requests in the usage ledger" + (" since then" if since else ""))
        return 0
    cur = cfg.currency
    head = f"{args.by.upper():<28} {'REQ':>5} {'PROMPT':>9} {'CACHED':>8} {'COMPL':>8} {'BUSY s':>8} {'Wh':>8} "
    print(head + f"{'LOCAL':>14} {'/Mtok':>14}   CLOUD (comparable)")
    for r in rows:
        print(f"{r.group[:28]:<28} {r.requests:>5} {r.prompt_tokens:>9} {r.cached_tokens:>8} {r.completion_tokens:>8} "
              f"{r.busy_s:>8.1f} {r.energy_wh:>8.2f} {_money(r.local_cost, cur):>14} "
              f"{_money(r.local_per_mtok, cur):>14}   {_money(r.cloud_cost, cur)} ({r.cloud})")  # fmt: skip
    rate = "" if cur == "USD" else f"; shown in {cur} at {cfg.usd_rate:g} {cur}/USD"
    print(f"\nall traffic at cloud prices (USD per million tokens in/cached/out{rate}):")
    for p, c in cloud:
        cached = "-" if p.cached_input is None else f"{p.cached_input:g}"
        print(f"  {p.name:<36} {_money(c, cur):>14}   {p.input:g}/{cached}/{p.output:g}  ({p.date}, {p.source})")
    power = f"{cfg.watts:g} W × busy time unless RAPL measured it"
    hw = (f"hardware {cfg.hardware_cost:g} {cur} over {cfg.hardware_life_hours:g} busy h" if cfg.hardware_cost
          else "hardware cost not set (config.toml [usage] hardware_cost)")  # fmt: skip
    print(f"\nlocal = energy ({power}) × {cfg.price_per_kwh:g} {cur}/kWh + {hw}")
    return 0


def plot(points: list[tuple[float, float, float]], path: str, currency: str) -> None:
    """PNG of cumulative local vs comparable-cloud cost over time (matplotlib, Agg backend, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [datetime.fromtimestamp(t, tz=timezone.utc).astimezone() for t, _, _ in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.step(times, [p[1] for p in points], where="post", label="local (energy + hardware)")
    ax.step(times, [p[2] for p in points], where="post", label="cloud (comparable endpoint)")
    ax.set_ylabel(f"cumulative cost ({currency})")
    ax.set_title("hearth usage: local vs cloud")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
