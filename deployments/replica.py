"""What every engine shell does at start, in one place: identity, engine, transports."""

from __future__ import annotations

import asyncio
import os

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine_server import EngineServer
from deployments.options import EngineReplicaOptions
from deployments.protocol import LoadReport, TransferReport, TransferStats
from deployments.traffic.manager import KVMover
from engine.core import EngineCore
from kvstore.transfer.base import create_transport


def replica_identity() -> tuple[str, str]:
    """(this replica's unique id, as the router sees it; this Ray node's id)."""
    return serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().get_node_id()


async def start_engine_server(
    server_cls: type[EngineServer],
    config: EngineReplicaOptions,
    scheduler: DeploymentHandle,
    traffic: DeploymentHandle,
) -> EngineServer:
    replica_id, node_id = replica_identity()
    # NOTE: Ray sets OMP_NUM_THREADS from the replica's num_cpus; torch follows it.
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    engine_config = config.engine.engine_config(config.model, threads)
    engine = await asyncio.to_thread(EngineCore, engine_config)
    fallback = create_transport("object_store")
    transport = create_transport(
        config.transfer.transport, **_transport_kwargs(config, config.transfer.transport)
    )
    stats = TransferStats(replica_id=replica_id, node_id=node_id, role=server_cls.role)
    mover = KVMover(transport, stats, fallback=fallback)

    async def report(load: LoadReport, transfers: TransferStats) -> None:
        await scheduler.report.remote(load)
        await traffic.record.remote(TransferReport(node_id, transfers))

    server = server_cls(
        engine,
        mover,
        replica_id,
        node_id,
        reporter=report,
        report_interval_s=config.report_interval_s,
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
    return {"staging_bytes": config.transfer.nixl_staging_bytes}
