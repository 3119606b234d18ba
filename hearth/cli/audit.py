"""`hearth audit show|verify|checkpoint|transcript`: read the audit log in $HEARTH_HOME/audit/, check its hash chain
and MACs, and print or check a checkpoint kept elsewhere."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    from hearth.cli.main import env_epilog

    epilog = env_epilog(["HEARTH_HOME"])
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("audit", help="Read and verify the audit log", formatter_class=raw,
                       description="`hearth serve` writes one hash-chained record per request (time, request id, key "
                       "id, client, endpoint, model, token counts, status, latency, finish reason; never prompt or "
                       "completion text) to $HEARTH_HOME/audit/audit.jsonl.", epilog=epilog)  # fmt: skip
    audit_sub = p.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)

    s = audit_sub.add_parser("show", help="Show audit records", epilog=epilog)
    s.add_argument("--since", metavar="DATE", help="YYYY-MM-DD[THH:MM] (local time), or an age such as 30m, 12h, 7d")
    s.add_argument("--limit", type=int, help="only the last N records")
    s.add_argument("--json", action="store_true", help="print JSON lines, one record each")
    s.set_defaults(func=cmd_show)

    v = audit_sub.add_parser("verify", help="Verify the hash chain and its MACs", epilog=epilog,
                             description="Check every record's hash, MAC (key: $HEARTH_HOME/audit/audit.key), sequence "
                             "number and link to the one before, and the head's MAC; exit 1 naming the first broken "
                             "record if any was edited, removed, inserted, reordered or added without the key. With "
                             "--against, also check that the log still holds a checkpoint's records unchanged: this "
                             "detects a rewrite or truncation even by someone who has the key.")  # fmt: skip
    v.add_argument("--against", metavar="CHECKPOINT",
                   help="SEQ:HASH from `hearth audit checkpoint`, or a file holding it")  # fmt: skip
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=cmd_verify)

    c = audit_sub.add_parser("checkpoint", help="Print a checkpoint to keep elsewhere", epilog=epilog,
                             description="Verify the log, then print its end as SEQ:HASH (the record count and the "
                             "last record's hash; no secret in it). Keep it where whoever can write $HEARTH_HOME "
                             "cannot change it; `hearth audit verify --against SEQ:HASH` later proves the log still "
                             "holds those records unchanged.")  # fmt: skip
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_checkpoint)

    t = audit_sub.add_parser("transcript", help="Decrypt one request's transcript", epilog=epilog,
                             description="Print the request and response bodies kept by `hearth serve --transcripts` "
                             "(encrypted at rest) for one request id.")  # fmt: skip
    t.add_argument("request_id", help="the request id from `hearth audit show`")
    t.set_defaults(func=cmd_transcript)


def _since(text: str) -> str:
    """The --since value as an ISO UTC timestamp comparable with the records' `time` strings."""
    from datetime import datetime, timezone

    from hearth.cli.usage import parse_since

    when = datetime.fromtimestamp(parse_since(text), tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cmd_show(args) -> int:
    from hearth.governance.audit import read_records

    since = _since(args.since) if args.since else None
    records = [r for r in read_records() if since is None or str(r.get("time", "")) >= since]
    if args.limit is not None:
        records = records[-args.limit :] if args.limit > 0 else []
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    if not records:
        print("no audit records" + (" since then" if since else ""))
        return 0
    print(f"{'TIME (UTC)':<24} {'KEY':<8} {'CLIENT':<15} {'ENDPOINT':<20} {'STATUS':>6} {'PROMPT':>7} {'CACHED':>6} "
          f"{'COMPL':>6} {'MS':>8} {'FINISH':<8} REQUEST")  # fmt: skip
    for r in records:
        client, endpoint = str(r.get("client") or "-")[:15], str(r.get("endpoint") or "-")[:20]
        print(f"{str(r.get('time', '-')):<24} {r.get('key_id') or '-':<8} {client:<15} {endpoint:<20} "
              f"{r.get('status', '-'):>6} {r.get('prompt_tokens', 0):>7} {r.get('cached_tokens', 0):>6} "
              f"{r.get('completion_tokens', 0):>6} {r.get('latency_ms', 0):>8} {r.get('finish_reason') or '-':<8} "
              f"{r.get('request_id') or '-'}")  # fmt: skip
    return 0


def _against(text: str):
    """The --against value: a checkpoint, or the path of a file whose first line is one."""
    import os

    from hearth.governance.audit import Checkpoint

    if ":" not in text and os.path.isfile(text):
        with open(text, encoding="utf-8", errors="replace") as f:
            text = f.readline()
    return Checkpoint.parse(text)


def cmd_verify(args) -> int:
    from dataclasses import asdict

    from hearth.governance.audit import audit_dir, verify_log

    against = _against(args.against) if args.against is not None else None
    result = verify_log(against=against)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    elif result.ok:
        notes = []
        if result.unauthenticated:
            notes.append(f"records 1-{result.unauthenticated} were written before the log had its key: the key "
                         "vouches for them as they were when it was created, not as they were written")  # fmt: skip
        if against is not None:
            notes.append(f"records 1-{against.seq} match checkpoint {against.seq}")
        if result.checkpoint:
            notes.append(f"checkpoint {result.checkpoint} (keep it elsewhere: `--against` it detects a later rewrite)")
        print(f"ok: {result.num_records} records in {audit_dir()}, hash chain and MACs intact"
              + "".join(f"; {note}" for note in notes))  # fmt: skip
    else:
        print(f"BROKEN: {result.problem}", file=sys.stdout)
        print(f"{result.num_records} records verified before the break", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_checkpoint(args) -> int:
    from hearth.governance.audit import audit_dir, checkpoint

    cp = checkpoint()
    if args.json:
        print(json.dumps({"records": cp.seq, "hash": cp.hash, "checkpoint": str(cp)}))
    else:
        print(cp)
        print(f"(record {cp.seq} of {audit_dir()}; check later with `hearth audit verify --against {cp}`)",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_transcript(args) -> int:
    from hearth.governance.audit import read_transcript

    print(json.dumps(read_transcript(args.request_id), indent=2))
    return 0
