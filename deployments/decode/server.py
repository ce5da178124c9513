"""DecodeServer: receive a request's prefix KV, then decode it in the continuous batch.

The KV arrives through the KVMover (off the engine thread); the engine thread imports it
when blocks and a batch slot are free (arrival order), computes the last prompt token and
streams every output. Leaving the stream early aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.engine_server import EngineServer
from deployments.protocol import DecodeJob
from engine.core import EngineCore
from engine.output import RequestOutput, SequenceKV


class DecodeServer(EngineServer):
    role = "decode"

    async def generate(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        kv: SequenceKV | None = None
        if job.handoff is not None:
            data = await asyncio.to_thread(self.mover.receive, job.handoff.descriptor)
            kv = SequenceKV(job.handoff.token_ids, job.handoff.block_keys, data)
        num_tokens = len(job.prompt_token_ids)

        def add(engine: EngineCore) -> None:
            engine.add_request(
                job.request_id, job.prompt_token_ids, job.params, job.tenant_salt, kv=kv
            )

        def ready(engine: EngineCore) -> bool:
            return engine.can_import(num_tokens)

        stream = self.loop.submit(
            job.request_id, add, ready=ready if kv is not None else None, num_tokens=1
        )
        async for output in stream:
            yield output
