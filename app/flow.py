"""One choice's way through the cluster: plan → stored-KV reads on both sides → PE (first
token) → DE (the rest). ChatService calls `run_request` once per choice; `Backend` is the
seam (Serve handles in the app, in-process servers in tests).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from opentelemetry import trace

from app.api.errors import KVLoadFailed
from deployments import tracing
from deployments.protocol import (
    DecodeJob,
    KVHandoff,
    Plan,
    PlanRequest,
    PrefillJob,
    StoredPrefix,
)
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from kvstore.keys import chain_keys, root_key

logger = logging.getLogger(__name__)
carrier = tracing.carrier_of
# replicas lost under this process's requests, by stage: "prefill" (before the first token),
# "handoff" (the PE, after it), "decode" (the DE); reported by the Ingress's admission_stats
replica_losses: collections.Counter[str] = collections.Counter()


class Backend(Protocol):
    async def plan(self, request: PlanRequest) -> Plan: ...

    async def lookup(self, block_keys: tuple[bytes, ...]) -> StoredPrefix: ...

    def release(self, request_id: str) -> None: ...  # fire and forget: plan no longer needed

    async def load(self, node: str, keys: Sequence[bytes], request_id: str = "") -> list[Any]: ...

    def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]: ...

    def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    model_id: str = ""  # the engines' model fingerprint: roots every block key
    block_size: int = 64
    load_failure: str = "recompute"  # kvstore.load_failure: "recompute" | "fail"
    max_retries: int = 4  # ingress.max_replica_retries: lost replicas one choice survives


async def run_request(
    backend: Backend,
    model: ModelInfo,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    salt: bytes = b"",
    priority: int = 0,
    on_loaded: Callable[[], None] | None = None,
) -> AsyncIterator[RequestOutput]:
    """One choice: Scheduler → stored-KV reads → PE (first token) → DE (the rest). Outputs
    carry the prompt tokens the PE did not compute (stored + prefix-cache hits) as
    `num_cached_tokens`, and the first one the request path's own timings. `on_loaded`
    runs once the choice's stored-KV reads have ended (admission's read budget).

    A replica lost mid-request (`ReplicaLost`) costs a retry, up to `model.max_retries`:
    before the first token the choice starts again from the plan; after it, the DE's part
    moves to a live decode replica, which recomputes the KV of prompt + the tokens already
    streamed and continues after them (a seeded draw depends only on seed and position, so
    the continuation is the one the lost replica would have produced).

    Traced as a `choice` span (under the caller's current span) with children `schedule`,
    `kv.load` (a `kv.read` per side), `prefill` (to the KV handoff; a `first_token` event)
    and `decode` (a `replica_lost` event per move); the jobs carry each span's context, so
    the deployments' spans nest under them.
    """
    choice = tracing.start_span(
        "choice", None, **{tracing.REQUEST_ID: request_id}, prompt_tokens=len(prompt)
    )
    ctx = trace.set_span_in_context(choice)
    current = choice  # the innermost open span: a failure is recorded there
    retries = _Retries(request_id, model.max_retries)
    decoding = False
    try:
        keys = chain_keys(root_key(model.model_id, salt), prompt, model.block_size)
        while True:  # up to the first token, a lost replica restarts the choice
            try:
                start = time.perf_counter()
                with tracing.span("schedule", parent=ctx) as span:
                    plan = await backend.plan(
                        PlanRequest(
                            request_id,
                            len(prompt),
                            params.max_tokens,
                            tuple(keys),
                            trace=tracing.carrier_of(span),
                        )
                    )
                    span.set_attributes(_plan_attributes(plan))
                planned = time.perf_counter()
                with tracing.span("kv.load", parent=ctx, hit_blocks=plan.num_hit_blocks) as span:
                    handles, num_de_blocks = await _load(backend, plan, keys, model.load_failure)
                    span.set_attributes({"loaded_blocks": len(handles), "num_de_blocks": num_de_blocks})  # noqa: E501
                if on_loaded is not None:  # once per choice, retries or not
                    on_loaded()
                    on_loaded = None
                loaded = time.perf_counter()
                # NOTE: spans that outlive a `yield` are never made current (see tracing.span)
                current = tracing.start_span("prefill", ctx, replica=plan.prefill_replica)
                job = _prefill_job(plan, prompt, params, salt, priority, keys, handles, num_de_blocks)  # noqa: E501
                from_pe = backend.prefill(plan.prefill_node, replace(job, trace=carrier(current)))
                try:
                    first = await anext(from_pe)
                except BaseException:
                    await from_pe.aclose()  # type: ignore[attr-defined]
                    raise
                break
            except ReplicaLost as exc:
                if current is not choice:  # the prefill span; the choice goes on
                    tracing.fail(current, exc)
                    current.end()
                    current = choice
                await retries.wait(exc, "prefill")
        handoff: KVHandoff | None = None
        try:
            assert isinstance(first, RequestOutput)
            _raise_on_failure(first)
            current.add_event("first_token", {"cached_tokens": first.num_cached_tokens})
            first.metrics["schedule_s"] = planned - start
            first.metrics["kv_read_s"] = loaded - planned
            yield first  # TTFT: the first token comes straight from the PE
            if first.finished:
                return
            try:
                handoff = await anext(from_pe)  # the PE has handed the KV to the transport
                assert isinstance(handoff, KVHandoff)
            except ReplicaLost as exc:  # the DE recomputes the KV from the first token
                current.add_event("replica_lost", {"cause": str(exc)})
                await retries.wait(exc, "handoff")
        finally:
            await from_pe.aclose()  # type: ignore[attr-defined]
        current.end()
        cached = first.num_cached_tokens
        current = tracing.start_span("decode", ctx, replica=plan.decode_replica)
        emitted = list(first.new_token_ids)  # what the client has: a moved DE resumes after it
        djob = DecodeJob(
            request_id,
            prompt,
            params,
            salt,
            handoff,
            plan.decode_replica,
            prefix_blocks=tuple(handles[: handoff.num_de_blocks]) if handoff else (),
            num_stored_blocks=len(handles),
            emitted=() if handoff else tuple(emitted),
            trace=carrier(current),
        )
        finished = False
        while True:
            try:
                async with contextlib.aclosing(backend.decode(plan.decode_node, djob)) as outputs:
                    async for output in outputs:
                        decoding = True  # the DE has it: its reports retire the plan
                        _raise_on_failure(output)
                        output.num_cached_tokens = cached
                        emitted += output.new_token_ids
                        finished = output.finished
                        yield output
                return
            except ReplicaLost as exc:
                if finished:  # lost after its last output: nothing is missing
                    return
                current.add_event("replica_lost", {"cause": str(exc), "emitted": len(emitted)})
                await retries.wait(exc, "decode")
                # any live decode replica of the node; the lost one's KV is gone: recompute
                moved = {"handoff": None, "target_replica": None, "prefix_blocks": ()}
                djob = replace(djob, **moved, emitted=tuple(emitted))
    except BaseException as exc:
        tracing.fail(current, exc)  # GeneratorExit / CancelledError: the client left
        raise
    finally:
        if not decoding:  # ended before its DE took it: what was planned for it is void
            backend.release(request_id)
        tracing.end(current)
        tracing.end(choice)


async def stored_prefix(
    backend: Backend, model: ModelInfo, prompt: list[int], salt: bytes
) -> tuple[int, int]:
    """(hit tokens, SNIC read bytes) of the prompt's stored prefix, as the cluster index has
    it now: what admission charges to storage instead of prefill. (0, 0) if unknown."""
    keys = chain_keys(root_key(model.model_id, salt), prompt, model.block_size)
    if not keys:
        return 0, 0
    try:
        stored = await backend.lookup(tuple(keys))
    except Exception:  # the Scheduler restarting: charge the whole prompt as prefill
        logger.warning("stored-prefix lookup failed", exc_info=True)
        return 0, 0
    num_blocks = min(stored.num_blocks, (len(prompt) - 1) // model.block_size)
    snic = min(stored.num_snic_blocks, num_blocks)
    return num_blocks * model.block_size, snic * stored.block_bytes


class ReplicaLost(RuntimeError):
    """An engine replica died or became unreachable mid-call (the backend's translation of
    its transport's error, e.g. Ray's actor errors): the request itself may be retried."""


class _Retries:
    """A choice's retry budget after lost replicas, with exponential backoff (0.5 s, 1 s, 2 s,
    capped at 4 s) so Serve can replace the replica or route around it meanwhile."""

    def __init__(self, request_id: str, limit: int):
        self.request_id = request_id
        self.limit = limit
        self.used = 0

    async def wait(self, exc: ReplicaLost, stage: str) -> None:
        replica_losses[stage] += 1
        if self.used >= self.limit:
            raise exc
        self.used += 1
        logger.warning(
            "request %s lost a replica (%s); retry %d of %d",
            self.request_id,
            exc,
            self.used,
            self.limit,
        )
        await asyncio.sleep(min(0.5 * 2 ** (self.used - 1), 4.0))


def _prefill_job(
    plan: Plan,
    prompt: list[int],
    params: SamplingParams,
    salt: bytes,
    priority: int,
    keys: list[bytes],
    handles: list[Any],
    num_de_blocks: int,
) -> PrefillJob:
    return PrefillJob(
        plan.request_id,
        prompt,
        params,
        salt,
        plan.prefill_replica,
        prefix_blocks=tuple(handles),
        prefix_keys=tuple(keys[: len(handles)]),
        num_de_blocks=num_de_blocks,
        priority=priority,
    )


def _plan_attributes(plan: Plan) -> dict[str, Any]:
    return {
        "read_path": plan.read_path,
        "prefill_replica": plan.prefill_replica,
        "decode_replica": plan.decode_replica,
        "hit_blocks": plan.num_hit_blocks,
        "num_de_blocks": plan.num_de_blocks,
    }


async def _load(
    backend: Backend, plan: Plan, keys: list[bytes], policy: str = "recompute"
) -> tuple[list[Any], int]:
    """Read the plan's hit blocks on both sides at once: the DE side reads the first
    `num_de_blocks`, the PE side the rest. Returns the DRAM handles of the longest
    contiguous prefix that arrived and how many of them the DE side holds.

    NOTE: a block missing or corrupt on either side ends the prefix there: the PE
    computes everything after it (recompute, never wrong KV). With `policy="fail"` a read
    that fails or comes back short raises KVLoadFailed instead.
    """
    if plan.num_hit_blocks == 0:
        return [], 0
    split = plan.num_de_blocks

    async def read(side: str, node: str, part: list[bytes]) -> list[Any]:
        if not part:
            return []
        with tracing.span("kv.read", side=side, node=node, blocks=len(part)) as span:
            try:
                got = await backend.load(node, part, plan.request_id)
            except Exception as exc:  # a TrafficManager restarting, a closed SNIC: recompute
                logger.warning("stored-KV read on %s failed (%s)", node, policy, exc_info=True)
                tracing.fail(span, exc)
                got = []
            span.set_attribute("blocks_read", len(got))
            if policy == "fail" and len(got) < len(part):
                raise KVLoadFailed(
                    f"stored KV of {len(part) - len(got)} of {len(part)} planned blocks could "
                    f"not be read on {node} (kvstore.load_failure: fail)"
                )
            return got

    de_part, pe_part = await asyncio.gather(
        read("de", plan.decode_node, keys[:split]),
        read("pe", plan.prefill_node, keys[split : plan.num_hit_blocks]),
    )
    if len(de_part) < split:
        return de_part, len(de_part)
    return de_part + pe_part, split


class EngineFailure(RuntimeError):
    """An engine ended the request with "error"/"abort": a server error, not a reply."""


def _raise_on_failure(output: RequestOutput) -> None:
    if output.finished and output.finish_reason in ("error", "abort"):
        raise EngineFailure(f"request {output.request_id} ended with {output.finish_reason}")
