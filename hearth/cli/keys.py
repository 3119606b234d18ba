"""`hearth keys create|list|revoke`: API keys for `hearth serve`, stored hashed in $HEARTH_HOME/keys (mode 0600)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    from hearth.cli.main import env_epilog

    p = sub.add_parser("keys", help="Manage API keys", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Create, list and revoke API keys. Once any key exists, `hearth serve` requires "
                       "`Authorization: Bearer <key>` on every route but /health and the web page.",
                       epilog=env_epilog(["HEARTH_HOME"]))  # fmt: skip
    keys_sub = p.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    c = keys_sub.add_parser("create", help="Create a key (shown once)", formatter_class=raw,
                            description="Create an API key and print it once; only a salted hash is stored.",
                            epilog="examples:\n  hearth keys create --name laptop\n  hearth keys create --name ops "
                            "--scope admin --expires 2026-12-31\n  hearth keys create --name batch --rpm 60 --tpm "
                            "100000\n\n" + env_epilog(["HEARTH_HOME"]))  # fmt: skip
    c.add_argument("--name", required=True, help="a label for the key (who or what uses it)")
    c.add_argument("--scope", choices=["chat", "admin"], default="chat",
                   help="chat: the /v1 API; admin: also /metrics (default chat)")  # fmt: skip
    c.add_argument("--rpm", type=int, help="most requests per minute (default: no limit)")
    c.add_argument("--tpm", type=int, help="most prompt + completion tokens per minute; a request reserves its "
                   "prompt and max_tokens up front, one without max_tokens gets what the key has left (default: no "
                   "limit)")  # fmt: skip
    c.add_argument("--expires", metavar="DATE", help="expiry, YYYY-MM-DD or an ISO date-time (UTC unless given)")
    c.add_argument("--json", action="store_true", help="print JSON (the key and its record)")
    c.set_defaults(func=cmd_create)

    ls = keys_sub.add_parser("list", help="List keys",
                             epilog=env_epilog(["HEARTH_HOME"]))  # fmt: skip
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    r = keys_sub.add_parser("revoke", help="Revoke a key", description="Revoke a key by id or name; a running "
                            "server refuses it from its next request.", epilog=env_epilog(["HEARTH_HOME"]))  # fmt: skip
    r.add_argument("key", metavar="ID_OR_NAME", help="the key's id (from `hearth keys list`) or its unique name")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_revoke)


def cmd_create(args) -> int:
    from hearth.governance.keys import create_key, keys_path

    key, record = create_key(args.name, args.scope, args.rpm, args.tpm, args.expires)
    if args.json:
        print(json.dumps({"key": key, **record.public()}, indent=2))
    else:
        print(key)
    print(f"created key {record.id} ({record.name}, scope {record.scope}) in {keys_path()}; save it now: it is shown "
          "only this once", file=sys.stderr)  # fmt: skip
    return 0


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def cmd_list(args) -> int:
    from hearth.governance.keys import list_keys

    records = list_keys()
    if args.json:
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    if not records:
        print("no API keys (create one with `hearth keys create --name NAME`)")
        return 0
    print(f"{'ID':<9} {'NAME':<20} {'SCOPE':<6} {'RPM':>6} {'TPM':>9} {'STATUS':<8} {'CREATED':<21} EXPIRES")
    for r in records:
        print(f"{r.id:<9} {r.name[:20]:<20} {r.scope:<6} {_limit(r.rpm):>6} {_limit(r.tpm):>9} {r.status:<8} "
              f"{r.created:<21} {r.expires or '-'}")  # fmt: skip
    return 0


def cmd_revoke(args) -> int:
    from hearth.governance.keys import revoke_key

    record = revoke_key(args.key)
    if args.json:
        print(json.dumps(record.public(), indent=2))
    else:
        print(f"revoked key {record.id} ({record.name}) at {record.revoked}")
    return 0
