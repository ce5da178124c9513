"""What every engine shell does at start, in one place: identity, engine, transports."""

from __future__ import annotations

import asyncio

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import tracing
from deployments.engine_server import EngineServer
from deployments.options import EngineReplicaOptions
from deployments.protocol import LoadReport, TransferStats
from deployments.traffic.mover import KVMover
from engine import env
from engine.core import EngineCore
from kvstore.tiers.object_store import block_to_object, fetch_blocks
from kvstore.transfer.base import create_transport


def replica_id() -> str:
    """This replica's unique id, as the router sees it."""
    return serve.get_replica_context().replica_id.unique_id


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): what the Scheduler watches."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


async def start_engine_server(
    server_cls: type[EngineServer],
    config: EngineReplicaOptions,
    scheduler: DeploymentHandle,
    traffic: DeploymentHandle,
    persist_blocks: bool = True,
) -> EngineServer:
    rid, node_id = replica_id(), config.node
    tracing.setup_tracing(config.tracing, f"dualpath.{server_cls.role}.{node_id}")
    # NOTE: Ray sets OMP_NUM_THREADS from the replica's num_cpus; torch follows it.
    threads = env.omp_num_threads()
    prefill = server_cls.role == "prefill"
    engine_config = config.engine.engine_config(config.model, threads, prefill=prefill)
    engine = await asyncio.to_thread(EngineCore, engine_config)
    fallback = create_transport("object_store")
    transport = create_transport(
        config.transfer.transport, **_transport_kwargs(config, config.transfer.transport)
    )
    stats = TransferStats(replica_id=rid, node_id=node_id, role=server_cls.role)
    mover = KVMover(transport, stats, fallback=fallback)

    async def report(load: LoadReport, transfers: TransferStats) -> None:
        await scheduler.report.remote(load)
        await traffic.record.remote(transfers)

    async def persist(blocks: list[tuple[bytes, torch.Tensor]]) -> None:
        await traffic.persist.remote([(key, block_to_object(b)) for key, b in blocks])

    server = server_cls(
        engine,
        mover,
        rid,
        node_id,
        reporter=report,
        report_interval_s=config.report_interval_s,
        fetch_blocks=fetch_blocks,
        persist=persist if server_cls.role == "decode" and persist_blocks else None,
        on_transfer_failure=config.transfer.on_failure,
        ray_node_id=ray_node_id(),
    )
    await server.start()
    return server


def _transport_kwargs(config: EngineReplicaOptions, name: str) -> dict[str, object]:
    if name == "object_store":
        return {}
    if name == "auto":
        from kvstore.transfer.base import nixl_available

        if not nixl_available():
            return {}
    return {
        "staging_bytes": config.transfer.nixl_staging_bytes,
        "lease_s": config.transfer.lease_s,
    }
