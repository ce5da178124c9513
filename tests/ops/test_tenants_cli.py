"""`python -m ops key new` and `python -m ops usage` (no app running)."""

from __future__ import annotations

import re
import time

from app.auth import Authenticator, AuthSection, TenantSection
from app.ledger import Ledger, UsageRecord
from ops.cli import main


def test_key_new_prints_a_key_whose_hash_authenticates(capsys):
    assert main(["key", "new", "acme"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"(sk-acme-\S+)", out).group(1)
    digest = re.search(r"key_sha256: \['([0-9a-f]{64})'\]", out).group(1)
    auth = Authenticator(
        AuthSection(tenants=[TenantSection(name="acme", key_sha256=[digest])]), environ={}
    )
    assert auth.authenticate(f"Bearer {key}").name == "acme"


def test_usage_reads_the_ledger(tmp_path, capsys):
    path = tmp_path / "usage.jsonl"
    ledger = Ledger(path)
    for tenant, cost in [("acme", 0.25), ("acme", 0.5), ("zeta", 1.0)]:
        ledger.record(
            UsageRecord(
                time.time() - 60, "r", tenant, "m", "default", "peak", "ok", 10, 20, 30, cost, "USD"
            )
        )
    ledger.close()
    assert main(["usage", "--ledger", str(path), "--tenant", "acme", "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert "acme" in out and "zeta" not in out
    assert "0.750000 USD" in out
