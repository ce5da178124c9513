"""DecodeEngine deployment: a thin Serve shell over DecodeServer (streams RequestOutputs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.decode.server import DecodeServer
from deployments.options import EngineReplicaOptions
from deployments.protocol import DecodeJob
from deployments.replica import start_engine_server
from engine.output import RequestOutput


class DecodeEngine:
    async def __init__(
        self,
        config: EngineReplicaOptions,
        scheduler: DeploymentHandle,
        traffic: DeploymentHandle,
        persist_blocks: bool = True,
    ):
        server = await start_engine_server(DecodeServer, config, scheduler, traffic, persist_blocks)
        assert isinstance(server, DecodeServer)
        self.server = server

    async def generate(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        async for output in self.server.generate(job):
            yield output

    def record_routing_stats(self) -> dict[str, Any]:
        return self.server.load_report().routing_stats()

    def check_health(self) -> None:
        if not self.server.is_healthy():
            raise RuntimeError("decode engine thread died")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)  # None when __init__ failed
        if server is not None:
            await server.close()
