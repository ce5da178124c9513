"""PrefillServer: compute a prompt prefix's KV and hand it to a decode engine.

The PE prefills every prompt token but the last (prefix-cache hits are skipped by the
engine), exports the KV as Full Blocks and sends it layer by layer through the KVMover.
The DE computes the last prompt token itself and samples from it, so all sampling state
(seed, penalties, min_tokens) stays on one side and greedy output is identical to a single
engine run.
"""

from __future__ import annotations

import asyncio
import time

from deployments.engine_server import EngineServer
from deployments.protocol import KVHandoff, PrefillJob
from engine.output import RequestOutput


class PrefillError(RuntimeError):
    pass


class PrefillServer(EngineServer):
    role = "prefill"

    async def prefill(self, job: PrefillJob) -> KVHandoff:
        start = time.perf_counter()
        stream = self.loop.submit(
            job.request_id,
            lambda engine: engine.add_prefill(job.request_id, job.token_ids, job.tenant_salt),
            num_tokens=len(job.token_ids),
        )
        final: RequestOutput | None = None
        async for output in stream:
            final = output
        if final is None or final.kv is None:
            reason = final.finish_reason if final else "no output"
            raise PrefillError(f"prefill of {job.request_id} ended without KV ({reason})")
        prefill_s = time.perf_counter() - start
        kv = final.kv
        descriptor = await asyncio.to_thread(self.mover.send, job.request_id, kv)
        return KVHandoff(
            request_id=job.request_id,
            token_ids=kv.token_ids,
            block_keys=kv.block_keys,
            num_cached_tokens=final.num_cached_tokens,
            descriptor=descriptor,
            prefill_s=prefill_s,
            send_s=time.perf_counter() - start - prefill_s,
        )
