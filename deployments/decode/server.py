"""DecodeServer: receive a request's prompt KV, then decode it in the continuous batch.

The KV arrives through the KVMover (off the engine thread), merged with the hit blocks this
node read itself (DE-read path: handles into this node's DRAM buffer); the engine thread
imports it when blocks and a batch slot are free (arrival order), resumes from the PE's
first token and sampling state, and streams every later output. Every full block not yet
stored (the prompt's new blocks, then each block that fills while decoding) goes to this
node's KV store. Leaving the stream early aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.engine_server import EngineServer
from deployments.protocol import DecodeJob
from engine.core import EngineCore
from engine.kv_import import PrefixKV
from engine.output import RequestOutput, SequenceKV


class DecodeServer(EngineServer):
    role = "decode"

    async def generate(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        kv: SequenceKV | None = None
        prefix: PrefixKV | None = None
        handoff = job.handoff
        if handoff is not None:
            blocks_task = asyncio.ensure_future(self.fetch_blocks(job.prefix_blocks))
            data = await asyncio.to_thread(self.mover.receive, handoff.descriptor)
            kv = SequenceKV(
                handoff.token_ids,
                handoff.block_keys,
                data,
                output_token_ids=handoff.output_token_ids,
                generator_state=handoff.generator_state,
                first_block=handoff.first_block,
            )
            blocks = await blocks_task
            if blocks:
                prefix = PrefixKV(handoff.block_keys[: len(blocks)], blocks)
        num_tokens = len(job.prompt_token_ids) + (len(kv.output_token_ids) if kv else 0)
        persist_from = job.num_stored_blocks if self.persist is not None else None

        def add(engine: EngineCore) -> None:
            engine.add_request(
                job.request_id,
                job.prompt_token_ids,
                job.params,
                job.tenant_salt,
                kv=kv,
                prefix=prefix,
                persist_from_block=persist_from,
            )

        def ready(engine: EngineCore) -> bool:
            return engine.can_import(num_tokens)

        stream = self.loop.submit(
            job.request_id, add, ready=ready if kv is not None else None, num_tokens=num_tokens
        )
        async for output in stream:
            yield output
