"""A request's end as metrics: the Frontend calls `observe_outcome` with each audit record
(every outcome, refusals included) and the request's meter. No Ray here: `Metrics` decides
where the numbers go."""

from __future__ import annotations

from app.admission.gate import Meter
from app.audit import AuditRecord
from deployments.metrics import Metrics


def observe_outcome(metrics: Metrics, record: AuditRecord, meter: Meter | None) -> None:
    tier = record.service_tier or "none"
    metrics.inc("dualpath_requests_total", service_tier=tier, status=record.status)
    if record.status == "rejected":
        reason = record.error_code or str(record.http_status)
        metrics.inc("dualpath_admission_rejections_total", reason=reason, service_tier=tier)
        return
    metrics.inc("dualpath_prompt_tokens_total", record.prompt_tokens)
    metrics.inc("dualpath_cost_total", record.cost, service_tier=tier, window=record.window or "")
    if meter is None:
        return
    drafted, accepted, steps = meter.spec_counts()
    if drafted:
        tenant = record.tenant
        metrics.inc("dualpath_spec_drafted_tokens_total", drafted, tenant=tenant)
        metrics.inc("dualpath_spec_accepted_tokens_total", accepted, tenant=tenant)
        metrics.inc("dualpath_spec_verify_steps_total", steps, tenant=tenant)
    ttft_s, tpot_s = meter.ttft_s, meter.tpot_s
    if ttft_s is not None:
        metrics.observe("dualpath_ttft_seconds", ttft_s, service_tier=tier)
    if tpot_s is not None:
        metrics.observe("dualpath_tpot_seconds", tpot_s, service_tier=tier)
