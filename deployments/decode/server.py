"""DecodeServer: receive a request's prompt KV, then decode it in the continuous batch.

The KV arrives through the KVMover (off the engine thread); the engine thread imports it
when blocks and a batch slot are free (arrival order), resumes from the PE's first token
and sampling state, and streams every later output. Leaving the stream early aborts the
request and frees its blocks.
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
        handoff = job.handoff
        if handoff is not None:
            data = await asyncio.to_thread(self.mover.receive, handoff.descriptor)
            kv = SequenceKV(
                handoff.token_ids,
                handoff.block_keys,
                data,
                output_token_ids=handoff.output_token_ids,
                generator_state=handoff.generator_state,
            )
        num_tokens = len(job.prompt_token_ids) + (len(kv.output_token_ids) if kv else 0)

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
