"""A request's stored KV, as the request path reads it: how much of a prompt the cluster
holds (admission) and the plan's reads on both sides, pulls from other nodes' DRAM included
(the flow's `kv.load` step)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from app.api.errors import KVLoadFailed
from app.cluster import Cluster
from deployments import tracing
from deployments.options import KVFailurePolicy
from deployments.protocol import Plan
from kvstore.keys import chain_keys, root_key

if TYPE_CHECKING:
    from app.choice_flow import ModelInfo

logger = logging.getLogger(__name__)


async def stored_prefix(
    cluster: Cluster, model: ModelInfo, prompt: list[int], salt: bytes
) -> tuple[int, int]:
    """(hit tokens, SNIC read bytes) of the prompt's stored prefix, as the cluster index has
    it now: what admission charges to storage instead of prefill. (0, 0) if unknown."""
    keys = chain_keys(root_key(model.model_id, salt), prompt, model.block_size)
    if not keys:
        return 0, 0
    try:
        stored = await cluster.lookup(tuple(keys))
    except Exception:  # the Scheduler restarting: charge the whole prompt as prefill
        logger.warning("stored-prefix lookup failed", exc_info=True)
        return 0, 0
    num_blocks = min(stored.num_blocks, (len(prompt) - 1) // model.block_size)
    snic = min(stored.num_snic_blocks, num_blocks)
    return num_blocks * model.block_size, snic * stored.block_bytes


async def read_stored_kv(
    cluster: Cluster,
    plan: Plan,
    keys: list[bytes],
    load_failure: KVFailurePolicy = KVFailurePolicy.RECOMPUTE,
) -> tuple[list[Any], int]:
    """Read the plan's hit blocks on both sides at once: the DE side reads the first
    `num_de_blocks`, the PE side the rest; runs the plan pulls from another node's DRAM are
    asked of that node (`dram_only`: its object store, no SNIC read). Returns the DRAM
    handles of the longest contiguous prefix that arrived and how many of them the DE side
    holds.

    NOTE: a block missing or corrupt on either side ends the prefix there: the PE
    computes everything after it (recompute, never wrong KV). With `load_failure="fail"` a
    read that fails or comes back short raises KVLoadFailed instead.
    """
    if plan.num_hit_blocks == 0:
        return [], 0
    split = plan.num_de_blocks

    async def read(side: str, node: str, start: int, end: int, pull: bool) -> list[Any]:
        part = keys[start:end]
        name = "kv.pull" if pull else "kv.read"
        with tracing.span(name, side=side, node=node, blocks=len(part)) as span:
            try:
                got = await cluster.load(node, part, plan.request_id, dram_only=pull)
            except Exception as exc:  # a TrafficManager restarting, a closed SNIC: recompute
                logger.warning(
                    "stored-KV read on %s failed (%s)", node, load_failure, exc_info=True
                )
                tracing.fail(span, exc)
                got = []
            span.set_attribute("blocks_read", len(got))
            if load_failure == KVFailurePolicy.FAIL and len(got) < len(part):
                raise KVLoadFailed(
                    f"stored KV of {len(part) - len(got)} of {len(part)} planned blocks could "
                    f"not be read on {node} (kvstore.load_failure: fail)"
                )
            return got

    sides = [
        ("de", plan.decode_node, 0, split),
        ("pe", plan.prefill_node, split, plan.num_hit_blocks),
    ]
    segments = [seg for side in sides for seg in _segments(*side, plan.pulls)]
    parts = await asyncio.gather(*(read(*seg) for seg in segments))
    handles: list[Any] = []
    for (_, _, start, end, _), got in zip(segments, parts, strict=True):
        handles += got
        if len(got) < end - start:  # the prefix ends here: the PE computes the rest
            return handles, min(len(handles), split)
    return handles, split


def _segments(
    side: str, node: str, start: int, end: int, pulls: tuple[tuple[int, int, str], ...]
) -> list[tuple[str, str, int, int, bool]]:
    """Blocks [start, end) of one read side as consecutive (side, node, start, end, pulled)
    segments: the runs the plan pulls from another node's DRAM, the rest on `node`."""
    out: list[tuple[str, str, int, int, bool]] = []
    at = start
    for a, b, source in sorted(pulls):
        a, b = max(a, start), min(b, end)
        if a >= b:
            continue
        if at < a:
            out.append((side, node, at, a, False))
        out.append((side, source, a, b, True))
        at = b
    if at < end:
        out.append((side, node, at, end, False))
    return out
