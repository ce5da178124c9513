"""plan(request, view) -> Plan: which prefill and which decode replica serve a request.

Pure function (no Ray, torch, I/O or clock), so the simulator runs it unchanged.

Policy (issue 3; DualPath's read-path choice joins in issue 4):
  - prefill: the live PE with the fewest queued prompt tokens (ties: fewer running).
  - decode: among live DEs with room for the request's worst-case KV, the one with the
    fewest running sequences (ties: more free blocks); if none has room, the one with the
    most free blocks (it queues the import until blocks free up).
"""

from __future__ import annotations

from deployments.protocol import Plan, PlanRequest
from deployments.scheduler.view import ClusterView


class NoEngineAvailable(RuntimeError):
    """No live replica of a needed role: the caller answers 503 and retries later."""


def plan(request: PlanRequest, view: ClusterView, now: float) -> Plan:
    pes = view.live("prefill", now)
    if not pes:
        raise NoEngineAvailable("no prefill engine is ready")
    prefill = min(pes, key=lambda e: (e.queued_tokens, e.running, e.report.replica_id))
    des = view.live("decode", now)
    if not des:
        raise NoEngineAvailable("no decode engine is ready")
    need_tokens = request.num_prompt_tokens + request.max_tokens
    fits = [e for e in des if e.free_blocks * e.report.block_size >= need_tokens]
    if fits:
        decode = min(fits, key=lambda e: (e.running, -e.free_blocks, e.report.replica_id))
    else:
        decode = max(des, key=lambda e: (e.free_blocks, e.report.replica_id))
    return Plan(
        request_id=request.request_id,
        prefill_replica=prefill.report.replica_id,
        decode_replica=decode.report.replica_id,
    )


def plan_and_note(request: PlanRequest, view: ClusterView, now: float) -> Plan:
    """plan(), then charge the chosen replicas in the view until their next report."""
    result = plan(request, view, now)
    view.note_planned(result.prefill_replica, request.num_prompt_tokens)
    view.note_planned(result.decode_replica, request.num_prompt_tokens + request.max_tokens)
    return result
