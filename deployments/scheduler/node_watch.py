"""The Scheduler's watch on the Ray cluster: what lived on a Ray node that died (a host
lost: its engines, its TrafficManager and DRAM tier) leaves the ClusterView within about
a second, instead of after `stale_after_s` of silence."""

from __future__ import annotations

import asyncio
import logging

import ray

from deployments.scheduler.view import ClusterView

logger = logging.getLogger(__name__)
NODE_WATCH_S = 1.0  # how often the Scheduler asks Ray which nodes died


async def watch_ray_nodes(view: ClusterView, lost: set[str], period_s: float = NODE_WATCH_S):
    """Forever: ask Ray (the GCS) which nodes are dead and drop theirs from `view`; `lost`
    collects the dead node ids (a node that rejoins is a new id)."""
    while True:
        await asyncio.sleep(period_s)
        if not ray.is_initialized():
            continue
        try:
            nodes = await asyncio.to_thread(ray.nodes)
        except Exception:  # the GCS restarting: try again next time
            logger.warning("could not list the Ray nodes", exc_info=True)
            continue
        dead = {n["NodeID"] for n in nodes if not n.get("Alive", True)}
        replicas, dropped = view.drop_ray_nodes(dead)
        if replicas or dropped:
            gone = sorted(n[:12] for n in dead - lost)
            logger.warning("Ray node(s) %s died: dropped %s and %s", gone, replicas, dropped)
        lost |= dead
