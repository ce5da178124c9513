"""ServeCluster: the request path's hops over Serve handles (Scheduler, TrafficManagers, PEs,
DEs), each call its own Serve request so concurrent choices are routed independently."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray.exceptions import RayActorError
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from app.cluster import ReplicaLost
from app.roster import Roster
from deployments import protocol as msg
from deployments import tracing
from engine.output import RequestOutput

logger = logging.getLogger(__name__)
NodeHandles = dict[str, DeploymentHandle]  # "prefill" / "decode" / "traffic" -> handle


def as_own_request(method: Any, arg: Any, **kwargs: Any) -> Any:
    """`method.remote(arg, **kwargs)` as its own Serve request, with a fresh internal request id.

    NOTE: Serve gives every handle call made while serving one request that request's
    internal id, and a router without FIFOMixin (ours: it must honour the Scheduler's
    replica choice) matches routed replicas to pending calls by that id, so two concurrent
    calls (the `n` choices) overwrite each other and one is never routed. Each call gets its
    own id in a copied context; we cancel our calls ourselves (see ServeCluster).
    """

    def call() -> Any:
        serve_context._set_request_context(_internal_request_id=uuid.uuid4().hex)
        return method.remote(arg, **kwargs)

    return contextvars.copy_context().run(call)


class ServeCluster:
    """`app.cluster.Cluster` (and `ClusterStatus`) over Serve handles: the Scheduler, the read
    side's TrafficManagers, the PE and the DE (each logical node has its own deployments,
    keyed by node name)."""

    def __init__(
        self,
        scheduler: DeploymentHandle,
        nodes: dict[str, NodeHandles],
        load_timeout_s: float | None = None,
    ):
        self.scheduler = scheduler
        # NOTE: a node that died takes its TrafficManager along, and a call to a deployment
        # with no replica left waits for one: a read must not wait for a host to come back
        self.load_timeout_s = load_timeout_s
        self.roster = Roster()  # fed by the capacity poll (`engines`)
        self.prefill_engines = {
            n: h["prefill"].options(stream=True) for n, h in nodes.items() if "prefill" in h
        }
        self.decode_engines = {
            n: h["decode"].options(stream=True) for n, h in nodes.items() if "decode" in h
        }
        self.traffic = {n: h["traffic"] for n, h in nodes.items()}

    async def plan(self, request: msg.PlanRequest) -> msg.Plan:
        return await self._unary(self.scheduler.plan, request)

    async def engines(self) -> list[msg.LoadReport]:
        reports = await self.scheduler.engines.remote()
        self.roster.update((r.replica_id for r in reports), time.time())
        return reports

    async def read_capacity(self) -> msg.ReadCapacity:
        return await self.scheduler.read_capacity.remote()

    def release(self, request_id: str) -> None:
        """Tell the Scheduler a planned request ended early (not awaited: may run in a
        cancelled task's cleanup)."""
        try:
            as_own_request(self.scheduler.release, request_id)
        except Exception:  # shutting down: the plan expires by its TTL instead
            logger.debug("could not release the plan of %s", request_id, exc_info=True)

    async def replace_decode(
        self, request_id: str, lost_replica: str, num_tokens: int
    ) -> tuple[str, str] | None:
        try:
            return await self._unary(
                self.scheduler.replace_decode, request_id, lost=lost_replica, num_tokens=num_tokens
            )
        except Exception:  # the Scheduler restarting: stay on the node, Serve routes
            logger.warning("no replacement decode replica for %s", request_id, exc_info=True)
            return None

    async def lost(self, replica_id: str) -> None:
        try:
            await self._unary(self.scheduler.forget, replica_id)
        except Exception:  # the Scheduler restarting: its node watch drops the replica
            logger.debug("could not report lost replica %s", replica_id, exc_info=True)

    async def lookup(self, block_keys: tuple[bytes, ...]) -> msg.StoredPrefix:
        return await self._unary(self.scheduler.lookup, block_keys)

    async def load(
        self, node: str, keys: Sequence[bytes], request_id: str = "", dram_only: bool = False
    ) -> list[Any]:
        # the read's span (current here) is the parent of the TrafficManager's
        read = self._unary(
            self.traffic[node].load,
            list(keys),
            trace=tracing.inject(),
            request_id=request_id or None,
            dram_only=dram_only,
        )
        return await asyncio.wait_for(read, self.load_timeout_s)

    async def _unary(self, method: Any, arg: Any, **kwargs: Any) -> Any:
        response = as_own_request(method, arg, **kwargs)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # client gone: stop the prefill too
            raise
        except RayActorError as exc:  # the replica died (or is unreachable) under the call
            raise _lost(method, exc) from exc

    def prefill(
        self, node: str, job: msg.PrefillJob
    ) -> AsyncIterator[RequestOutput | msg.KVHandoff]:
        return self._stream(self.prefill_engines[node].prefill, job)

    def decode(self, node: str, job: msg.DecodeJob) -> AsyncIterator[RequestOutput]:
        return self._stream(self.decode_engines[node].generate, job)

    async def _stream(self, method: Any, arg: Any) -> AsyncIterator[Any]:
        items = as_own_request(method, arg)
        target = getattr(arg, "target_replica", None)
        try:
            while True:
                try:
                    item = await self._next(items, target, method)
                except StopAsyncIteration:
                    return
                yield item
        except RayActorError as exc:  # the replica died mid-stream: the flow moves the request
            raise _lost(method, exc) from exc
        finally:
            items.cancel()  # a no-op once finished; aborts the engine request otherwise

    async def _next(self, items: Any, target: str | None, method: Any) -> Any:
        """The stream's next item; ReplicaLost if its replica leaves the Scheduler's view
        meanwhile (its Ray node died: the call may never be routed, nor answered)."""
        step = asyncio.ensure_future(anext(items))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=GUARD_S)
                if done:
                    return step.result()
                if target and self.roster.left(target, time.time()):
                    raise _lost(method, RuntimeError(f"replica {target} left the cluster"))
        finally:
            step.cancel()


GUARD_S = 1.0  # a stream item taking longer than this checks that its replica is still there


def _lost(method: Any, exc: Exception) -> ReplicaLost:
    name = method.deployment_name
    role = next((r for p, r in _ROLES.items() if name.startswith(p)), "")
    return ReplicaLost(f"{name}: {type(exc).__name__}", role)


_ROLES = {"PrefillEngine": "prefill", "DecodeEngine": "decode"}
