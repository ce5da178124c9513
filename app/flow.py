"""One choice's way through the cluster: plan → stored-KV reads on both sides → PE (first
token) → DE (the rest). ChatService calls `run_request` once per choice; `Backend` is the
seam (Serve handles in the app, in-process servers in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.protocol import DecodeJob, KVHandoff, Plan, PlanRequest, PrefillJob
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from kvstore.keys import chain_keys, root_key

logger = logging.getLogger(__name__)


class Backend(Protocol):
    async def plan(self, request: PlanRequest) -> Plan: ...

    async def load(self, node: str, keys: Sequence[bytes]) -> list[Any]: ...

    def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]: ...

    def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    model_id: str = ""  # the engines' model fingerprint: roots every block key
    block_size: int = 64


async def run_request(
    backend: Backend,
    model: ModelInfo,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    salt: bytes = b"",
    priority: int = 0,
) -> AsyncIterator[RequestOutput]:
    """One choice: Scheduler → stored-KV reads → PE (first token) → DE (the rest). Outputs
    carry the prompt tokens the PE did not compute (stored + prefix-cache hits) as
    `num_cached_tokens`, and the first one the request path's own timings."""
    keys = chain_keys(root_key(model.model_id, salt), prompt, model.block_size)
    start = time.perf_counter()
    plan = await backend.plan(PlanRequest(request_id, len(prompt), params.max_tokens, tuple(keys)))
    planned = time.perf_counter()
    handles, de_blocks = await _load(backend, plan, keys)
    loaded = time.perf_counter()
    prefill = PrefillJob(
        request_id,
        prompt,
        params,
        salt,
        plan.prefill_replica,
        prefix_blocks=tuple(handles),
        prefix_keys=tuple(keys[: len(handles)]),
        decode_has_blocks=de_blocks,
        priority=priority,
    )
    from_pe = backend.prefill(plan.prefill_node, prefill)
    async with contextlib.aclosing(from_pe):  # type: ignore[type-var]
        first = await anext(from_pe)
        assert isinstance(first, RequestOutput)
        _raise_on_failure(first)
        first.metrics["schedule_s"] = planned - start
        first.metrics["kv_read_s"] = loaded - planned
        yield first  # TTFT: the first token comes straight from the PE
        if first.finished:
            return
        handoff = await anext(from_pe)
        assert isinstance(handoff, KVHandoff)
    cached = first.num_cached_tokens
    job = DecodeJob(
        request_id,
        prompt,
        params,
        salt,
        handoff,
        plan.decode_replica,
        prefix_blocks=tuple(handles[: handoff.first_block]),
        num_stored_blocks=len(handles),
    )
    async with contextlib.aclosing(backend.decode(plan.decode_node, job)) as outputs:
        async for output in outputs:
            _raise_on_failure(output)
            output.num_cached_tokens = cached
            yield output


async def _load(backend: Backend, plan: Plan, keys: list[bytes]) -> tuple[list[Any], int]:
    """Read the plan's hit blocks on both sides at once: the DE side reads the first
    `de_read_blocks`, the PE side the rest. Returns the DRAM handles of the longest
    contiguous prefix that arrived and how many of them the DE side holds.

    NOTE: a block missing or corrupt on either side ends the prefix there: the PE
    computes everything after it (recompute, never wrong KV).
    """
    if plan.num_hit_blocks == 0:
        return [], 0
    split = plan.de_read_blocks

    async def read(node: str, part: list[bytes]) -> list[Any]:
        if not part:
            return []
        try:
            return await backend.load(node, part)
        except Exception:  # a TrafficManager restarting, a closed SNIC: recompute instead
            logger.warning("stored-KV read on %s failed; recomputing", node, exc_info=True)
            return []

    de_part, pe_part = await asyncio.gather(
        read(plan.decode_node, keys[:split]),
        read(plan.prefill_node, keys[split : plan.num_hit_blocks]),
    )
    if len(de_part) < split:
        return de_part, len(de_part)
    return de_part + pe_part, split


class EngineFailure(RuntimeError):
    """An engine ended the request with "error"/"abort": a server error, not a reply."""


def _raise_on_failure(output: RequestOutput) -> None:
    if output.finished and output.finish_reason in ("error", "abort"):
        raise EngineFailure(f"request {output.request_id} ended with {output.finish_reason}")
