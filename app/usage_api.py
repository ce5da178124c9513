"""GET /v1/usage: a tenant's usage and cost in time buckets (OpenAI usage-API shape).

Admins (or anyone, on an open app) may name any `tenant` or, naming none, see everyone's;
other keys see their own tenant's only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.api.errors import BadRequestError, PermissionDeniedError
from app.auth import Tenant
from app.ledger import BUCKET_WIDTHS, Ledger

WEEK_S = 7 * 86400


def usage_page(
    ledger: Ledger, tenant: Tenant, is_open: bool, query: Mapping[str, str]
) -> dict[str, Any]:
    """The page for `query` (start_time, end_time: unix seconds; bucket_width: 1m | 1h | 1d;
    tenant). Raises BadRequestError (400) or PermissionDeniedError (403)."""
    now = int(time.time())
    try:
        end = int(query.get("end_time", now))
        start = int(query.get("start_time", end - WEEK_S))
    except ValueError:
        raise BadRequestError("start_time and end_time are unix seconds") from None
    width = query.get("bucket_width", "1d")
    if width not in BUCKET_WIDTHS:
        raise BadRequestError("bucket_width is one of 1m, 1h, 1d", param="bucket_width")
    who = query.get("tenant")
    if is_open or tenant.config.admin:
        scope = who
    elif who not in (None, tenant.name):
        raise PermissionDeniedError("only admin keys may read other tenants' usage")
    else:
        scope = tenant.name
    try:
        data = ledger.buckets(start, end, BUCKET_WIDTHS[width], tenant=scope)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    return {"object": "page", "data": data, "has_more": False}
