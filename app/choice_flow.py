"""ChoiceFlow: one choice's way through the cluster: plan → stored-KV reads on both sides →
PE (first token) → DE (the rest). ChatService runs one per choice; `Cluster` is the seam.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from app.cluster import Cluster, ReplicaLost
from app.kv_reads import read_stored_kv
from deployments import tracing
from deployments.options import KVFailurePolicy
from deployments.protocol import DecodeJob, KVHandoff, Plan, PlanRequest, PrefillJob
from engine.output import FirstTokenTimings, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from kvstore.keys import chain_keys, root_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about the served model that the request path checks and keys KV by."""

    name: str
    max_model_len: int
    vocab_size: int
    model_id: str = ""  # the engines' model fingerprint: roots every block key
    block_size: int = 64


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """What a choice does when the cluster fails under it."""

    load_failure: KVFailurePolicy = KVFailurePolicy.RECOMPUTE  # kvstore.load_failure
    max_retries: int = 4  # ingress.max_replica_retries: lost replicas one choice survives
    first_backoff_s: float = 0.5  # doubles per retry ...
    max_backoff_s: float = 4.0  # ... up to this


class EngineFailure(RuntimeError):
    """An engine ended the request with "error"/"abort": a server error, not a reply."""


class ChoiceFlow:
    """One choice of one request, from the Scheduler's plan to the DE's last token.

    `run()` yields the choice's outputs; they carry the prompt tokens the PE did not compute
    (stored + prefix-cache hits) as `num_cached_tokens`, and the first one the request
    path's own timings. `on_loaded` runs once, when the stored-KV reads have ended (it moves
    the request from admission's read budget to its prefill budget).

    A replica lost mid-request (`ReplicaLost`) costs a retry, up to `recovery.max_retries`:
    before the first token the choice starts again from the plan; after it, the DE's part
    moves to a live decode replica, which recomputes the KV of prompt + the tokens already
    streamed and continues after them (a seeded draw depends only on seed and position, so
    the continuation is the one the lost replica would have produced).

    Traced as a `choice` span (under the caller's current span) with children `schedule`,
    `kv.load` (a `kv.read` per side), `prefill` (to the KV handoff; a `first_token` event)
    and `decode` (a `replica_lost` event per move); the jobs carry each span's context, so
    the deployments' spans nest under them. A failure is recorded on the innermost open one.
    """

    def __init__(
        self,
        cluster: Cluster,
        model: ModelInfo,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: bytes = b"",
        priority: int = 0,
        recovery: RecoveryPolicy | None = None,
        losses: collections.Counter[str] | None = None,
        on_loaded: Callable[[], None] | None = None,
    ):
        self.cluster, self.model = cluster, model
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.salt, self.priority = salt, priority
        self.recovery = recovery or RecoveryPolicy()
        # replicas lost under this choice, by stage: "prefill" (before the first token),
        # "handoff" (the PE, after it), "decode" (the DE); shared by a service's choices
        self.losses = losses if losses is not None else collections.Counter()
        self.on_loaded = on_loaded
        self.keys = chain_keys(root_key(model.model_id, salt), prompt, model.block_size)
        self.num_retries = 0
        self.taken_by_de = False  # from then on the DE's reports retire the plan
        self._choice: Span = trace.INVALID_SPAN  # started when the choice runs
        self._stage: Span | None = None  # the open `prefill` or `decode` span

    async def run(self) -> AsyncIterator[RequestOutput]:
        self._choice = tracing.start_span(
            "choice", None, **{tracing.REQUEST_ID: self.request_id}, prompt_tokens=len(self.prompt)
        )
        try:
            plan, handles, first, from_pe = await self.prefill()
            handoff: KVHandoff | None = None
            try:
                _raise_on_failure(first)
                yield first  # TTFT: the first token comes straight from the PE
                if first.finished:
                    return
                handoff = await self.handoff(from_pe)
            finally:
                await from_pe.aclose()  # type: ignore[attr-defined]
            self._end_stage()
            async with contextlib.aclosing(self.decode(plan, handles, first, handoff)) as outputs:
                async for output in outputs:
                    yield output
        except BaseException as exc:
            tracing.fail(self._stage or self._choice, exc)  # GeneratorExit: the client left
            raise
        finally:
            if not self.taken_by_de:  # ended before its DE took it: what was planned is void
                self.cluster.release(self.request_id)
            self._end_stage()
            tracing.end(self._choice)

    # ------------------------------------------------------------------ the steps
    async def plan(self) -> Plan:
        with tracing.span("schedule", parent=self._context()) as span:
            plan = await self.cluster.plan(
                PlanRequest(
                    self.request_id,
                    len(self.prompt),
                    self.params.max_tokens,
                    tuple(self.keys),
                    trace=tracing.carrier_of(span),
                )
            )
            span.set_attributes(_plan_attributes(plan))
        return plan

    async def load(self, plan: Plan) -> tuple[list[Any], int]:
        """The plan's stored KV, read on both sides at once: (DRAM handles of the leading
        blocks that arrived, how many of them the DE holds)."""
        ctx = self._context()
        with tracing.span("kv.load", parent=ctx, hit_blocks=plan.num_hit_blocks) as span:
            handles, num_de_blocks = await read_stored_kv(
                self.cluster, plan, self.keys, self.recovery.load_failure
            )
            span.set_attributes({"loaded_blocks": len(handles), "num_de_blocks": num_de_blocks})
        if self.on_loaded is not None:  # once per choice, retries or not
            self.on_loaded()
            self.on_loaded = None
        return handles, num_de_blocks

    async def prefill(
        self,
    ) -> tuple[Plan, list[Any], RequestOutput, AsyncIterator[RequestOutput | KVHandoff]]:
        """Plan, read and prefill until the first output; a lost replica starts it again.
        Returns the PE's stream, still open (the KV handoff follows the first output)."""
        while True:
            try:
                start = time.perf_counter()
                plan = await self.plan()
                planned = time.perf_counter()
                handles, num_de_blocks = await self.load(plan)
                loaded = time.perf_counter()
                # NOTE: spans that outlive a `yield` are never made current (see tracing.span)
                self._stage = tracing.start_span(
                    "prefill", self._context(), replica=plan.prefill_replica
                )
                job = self._prefill_job(plan, handles, num_de_blocks)
                from_pe = self.cluster.prefill(plan.prefill_node, job)
                try:
                    first = await anext(from_pe)
                except BaseException:
                    await from_pe.aclose()  # type: ignore[attr-defined]
                    raise
                assert isinstance(first, RequestOutput)
                timings = first.timings or FirstTokenTimings()
                first.timings = replace(
                    timings, schedule_s=planned - start, kv_read_s=loaded - planned
                )
                self._stage.add_event("first_token", {"cached_tokens": first.num_cached_tokens})
                return plan, handles, first, from_pe
            except ReplicaLost as exc:
                if self._stage is not None:  # the prefill span ends; the choice goes on
                    tracing.fail(self._stage, exc)
                    self._end_stage()
                if exc.role == "prefill":  # not planned onto again (its node may be gone)
                    await self.cluster.lost(plan.prefill_replica)
                await self._retry(exc, "prefill")

    async def handoff(self, from_pe: AsyncIterator[RequestOutput | KVHandoff]) -> KVHandoff | None:
        """Where the PE left the KV; None if the PE was lost after the first token (the DE
        then recomputes the KV from the tokens the client has)."""
        try:
            handoff = await anext(from_pe)
        except ReplicaLost as exc:
            assert self._stage is not None
            self._stage.add_event("replica_lost", {"cause": str(exc)})
            await self._retry(exc, "handoff")
            return None
        assert isinstance(handoff, KVHandoff)
        return handoff

    async def decode(
        self, plan: Plan, handles: list[Any], first: RequestOutput, handoff: KVHandoff | None
    ) -> AsyncIterator[RequestOutput]:
        """The DE's part; a lost DE moves it to a live decode replica of the node."""
        cached = first.num_cached_tokens
        self._stage = span = tracing.start_span(
            "decode", self._context(), replica=plan.decode_replica
        )
        emitted = list(first.new_token_ids)  # what the client has: a moved DE resumes after it
        job = DecodeJob(
            self.request_id,
            self.prompt,
            self.params,
            self.salt,
            handoff,
            plan.decode_replica,
            prefix_blocks=tuple(handles[: handoff.num_de_blocks]) if handoff else (),
            num_stored_blocks=len(handles),
            emitted=() if handoff else tuple(emitted),
            trace=tracing.carrier_of(span),
        )
        finished = False
        while True:
            try:
                async with contextlib.aclosing(self.cluster.decode(plan.decode_node, job)) as outs:
                    async for output in outs:
                        self.taken_by_de = True
                        _raise_on_failure(output)
                        output.num_cached_tokens = cached
                        emitted += output.new_token_ids
                        finished = output.finished
                        if finished and output.num_drafted_tokens:
                            span.set_attributes(_spec_attributes(output))
                        yield output
                return
            except ReplicaLost as exc:
                if finished:  # lost after its last output: nothing is missing
                    return
                span.add_event("replica_lost", {"cause": str(exc), "emitted": len(emitted)})
                await self._retry(exc, "decode")
                # a live decode replica on any node (the lost one's may be gone with it); its
                # KV is gone: the new DE recomputes prompt + emitted tokens
                plan = await self._move_decode(plan, len(self.prompt) + self.params.max_tokens)
                span.add_event("moved", {"node": plan.decode_node, "replica": plan.decode_replica})
                moved = {"handoff": None, "target_replica": plan.decode_replica or None}
                job = replace(job, **moved, prefix_blocks=(), emitted=tuple(emitted))

    # ------------------------------------------------------------------ helpers
    async def _move_decode(self, plan: Plan, num_tokens: int) -> Plan:
        """The plan with its DE replaced after a loss: the Scheduler's pick on any node, or
        the same node with no pinned replica (Serve routes) if it has none."""
        moved = await self.cluster.replace_decode(self.request_id, plan.decode_replica, num_tokens)
        if moved is None:
            return replace(plan, decode_replica="")
        node, replica = moved
        return replace(plan, decode_node=node, decode_replica=replica)

    def _prefill_job(self, plan: Plan, handles: list[Any], num_de_blocks: int) -> PrefillJob:
        return PrefillJob(
            plan.request_id,
            self.prompt,
            self.params,
            self.salt,
            plan.prefill_replica,
            prefix_blocks=tuple(handles),
            prefix_keys=tuple(self.keys[: len(handles)]),
            num_de_blocks=num_de_blocks,
            priority=self.priority,
            trace=tracing.carrier_of(self._stage) if self._stage else {},
        )

    def _context(self) -> Any:
        return trace.set_span_in_context(self._choice)

    def _end_stage(self) -> None:
        if self._stage is not None:
            tracing.end(self._stage)
            self._stage = None

    async def _retry(self, exc: ReplicaLost, stage: str) -> None:
        """Count the loss; wait with exponential backoff so Serve can replace the replica
        or route around it, or give up (re-raise) once the retries are spent."""
        self.losses[stage] += 1
        limit = self.recovery.max_retries
        if self.num_retries >= limit:
            raise exc
        self.num_retries += 1
        logger.warning(
            "request %s lost a replica (%s); retry %d of %d",
            self.request_id,
            exc,
            self.num_retries,
            limit,
        )
        backoff = self.recovery.first_backoff_s * 2 ** (self.num_retries - 1)
        await asyncio.sleep(min(backoff, self.recovery.max_backoff_s))


def _plan_attributes(plan: Plan) -> dict[str, Any]:
    return {
        "read_path": plan.read_path,
        "prefill_replica": plan.prefill_replica,
        "decode_replica": plan.decode_replica,
        "hit_blocks": plan.num_hit_blocks,
        "num_de_blocks": plan.num_de_blocks,
    }


def _raise_on_failure(output: RequestOutput) -> None:
    if output.finished and output.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
        raise EngineFailure(f"request {output.request_id} ended with {output.finish_reason}")


def _spec_attributes(output: RequestOutput) -> dict[str, float]:
    """Speculative decoding of a finished choice on its (last) decode engine."""
    drafted, accepted, steps = (
        output.num_drafted_tokens,
        output.num_accepted_tokens,
        output.num_spec_steps,
    )
    return {
        "spec.drafted_tokens": drafted,
        "spec.accepted_tokens": accepted,
        "spec.acceptance_rate": accepted / drafted,
        "spec.mean_accepted_length": 1 + accepted / steps if steps else 1.0,
    }
