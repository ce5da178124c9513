"""`python -m ops key new <tenant>` and `python -m ops usage`: issue API keys (only their
SHA-256 goes into the config) and read the per-tenant usage ledger without the app."""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from app.auth import hash_key
from app.ledger import BUCKET_WIDTHS, Ledger

DEFAULT_LEDGER = Path("~/.cache/dualpath-serve/usage.jsonl")


def cmd_key_new(args: argparse.Namespace) -> int:
    """A fresh key for `args.tenant`: the key once (give it to the tenant) and the config
    entry that holds only its hash."""
    key = f"sk-{args.tenant}-{secrets.token_urlsafe(24)}"
    console = Console(soft_wrap=True)
    console.print(f"API key (shown once): [bold]{key}[/bold]")
    console.print("serve_config.yaml, under args.auth.tenants:")
    console.print(f"  - name: {args.tenant}\n    key_sha256: ['{hash_key(key)}']", markup=False)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    ledger = Ledger(Path(args.ledger).expanduser())
    end = time.time()
    start = end - args.days * 86400
    buckets = ledger.buckets(start, end, BUCKET_WIDTHS[args.bucket], tenant=args.tenant)
    table = Table(title=f"usage, last {args.days:g} days ({ledger.path})")
    for col in (
        "bucket (UTC)",
        "tenant",
        "tier",
        "window",
        "requests",
        "input",
        "cached",
        "output",
        "cost",
    ):
        table.add_column(col, justify="left" if col in ("tenant", "tier", "window") else "right")
    for bucket in buckets:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(bucket["start_time"]))
        for r in bucket["results"]:
            table.add_row(
                when,
                r["tenant"],
                r["service_tier"],
                r["window"],
                str(r["num_model_requests"]),
                str(r["input_tokens"]),
                str(r["input_cached_tokens"]),
                str(r["output_tokens"]),
                f"{r['cost']:.6f} {r['currency']}",
            )
    Console(width=160).print(table)
    ledger.close()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_cmd", required=True)
    new = key.add_parser("new", help="make a key for a tenant; prints its config entry")
    new.add_argument("tenant")
    new.set_defaults(func=cmd_key_new)
    usage = sub.add_parser("usage", help="per-tenant usage and cost from the ledger file")
    usage.add_argument("--ledger", default=str(DEFAULT_LEDGER))
    usage.add_argument("--tenant", default=None)
    usage.add_argument("--days", type=float, default=7.0)
    usage.add_argument("--bucket", choices=sorted(BUCKET_WIDTHS), default="1d")
    usage.set_defaults(func=cmd_usage)
