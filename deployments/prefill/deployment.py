"""PrefillEngine deployment: a thin Serve shell over PrefillServer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.options import EngineReplicaOptions
from deployments.prefill.server import PrefillServer
from deployments.protocol import KVHandoff, PrefillJob
from deployments.replica import start_engine_server
from engine.output import RequestOutput


class PrefillEngine:
    async def __init__(
        self, config: EngineReplicaOptions, scheduler: DeploymentHandle, traffic: DeploymentHandle
    ):
        server = await start_engine_server(PrefillServer, config, scheduler, traffic)
        assert isinstance(server, PrefillServer)
        self.server = server

    async def prefill(self, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        async for item in self.server.prefill(job):
            yield item

    def record_routing_stats(self) -> dict[str, Any]:
        return self.server.load_report().routing_stats()

    def check_health(self) -> None:
        if not self.server.is_healthy():
            raise RuntimeError("prefill engine thread died")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)  # None when __init__ failed
        if server is not None:
            await server.close()
