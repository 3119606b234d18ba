"""`hearth ps`: the models a running `hearth serve` has loaded (its GET /api/ps): name, memory, processor, and when
each unloads."""

from __future__ import annotations

import json
import os
import time


def register(sub) -> None:
    p = sub.add_parser("ps", help="List the models a running server has loaded",
                       description="List the models a running `hearth serve` has loaded, with their memory and when "
                       "they unload. HEARTH_API_KEY is sent when set.")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the server's port (default 8000)")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_ps)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _until(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "Forever"
    left = max(expires_at - now, 0)
    if left < 60:
        return f"{left:.0f} seconds from now"
    if left < 3600:
        return f"{left / 60:.0f} minutes from now"
    return f"{left / 3600:.1f} hours from now"


def format_ps(models: list[dict], now: float) -> str:
    width = max([30, *(len(m["name"]) for m in models)])
    lines = [f"{'NAME':<{width}} {'SIZE':>10}  {'PROCESSOR':<10} {'STATE':<8} UNTIL"]
    for m in models:
        lines.append(f"{m['name']:<{width}} {_size(m['size']):>10}  {m['processor']:<10} {m['state']:<8} "
                     f"{_until(m['expires_at'], now)}")  # fmt: skip
    return "\n".join(lines)


def cmd_ps(args) -> int:
    import urllib.error
    import urllib.request

    from hearth.cli.main import CliError
    from hearth.cli.serve import base_url

    url = base_url(args.host, args.port) + "/api/ps"
    request = urllib.request.Request(url)
    key = os.environ.get("HEARTH_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        raise CliError(f"{url} answered {e.code}" + (" (set HEARTH_API_KEY)" if e.code == 401 else "")) from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"no server at {url} ({getattr(e, 'reason', e)}); start one with `hearth serve`") from None
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(format_ps(body.get("models", []), time.time()))
    return 0
