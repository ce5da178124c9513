"""PrefillServer: prefill a prompt, sample its first token, hand the KV to a decode engine.

The PE prefills the prompt (prefix-cache hits are skipped by the engine) and samples the
first token with the request's own params, so the client gets it without waiting for the
DE. The prompt's KV (Full Blocks), the first token and the seeded generator's state go to
the DE: KV layer by layer through the KVMover, the rest in the KVHandoff. The DE continues
exactly as one engine would (greedy and seeded output are identical; tested).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from deployments.engine_server import EngineServer
from deployments.protocol import KVHandoff, PrefillJob
from engine.output import RequestOutput


class PrefillError(RuntimeError):
    pass


class PrefillServer(EngineServer):
    role = "prefill"

    async def prefill(self, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        """Yield the first token as soon as it is sampled, then (unless the request already
        finished) the KVHandoff once the KV is with the transport."""
        start = time.perf_counter()
        stream = self.loop.submit(
            job.request_id,
            lambda e: e.add_prefill(job.request_id, job.token_ids, job.params, job.tenant_salt),
            num_tokens=len(job.token_ids),
        )
        first: RequestOutput | None = None
        async for output in stream:
            first = output
        if first is None or (first.kv is None and not first.finished):
            raise PrefillError(f"prefill of {job.request_id} ended without a token")
        prefill_s = time.perf_counter() - start
        kv, first.kv = first.kv, None
        yield first
        if kv is None:
            return
        descriptor = await asyncio.to_thread(self.mover.send, job.request_id, kv)
        yield KVHandoff(
            request_id=job.request_id,
            token_ids=kv.token_ids,
            block_keys=kv.block_keys,
            output_token_ids=kv.output_token_ids,
            generator_state=kv.generator_state,
            descriptor=descriptor,
            prefill_s=prefill_s,
            send_s=time.perf_counter() - start - prefill_s,
        )
