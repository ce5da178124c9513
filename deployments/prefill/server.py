"""PrefillServer: prefill a prompt, sample its first token, hand the KV to a decode engine.

The PE prefills the prompt and samples the first token with the request's own params, so
the client gets it without waiting for the DE. Hit blocks are not computed: local
prefix-cache hits are mapped, stored ones (read by either side's SNIC, handed over as DRAM
handles) are copied in layer by layer while the miss tokens compute. The prompt's KV from
`job.num_de_blocks` on (the DE holds the blocks before it when it read them itself),
and the first token go to the DE: KV layer by layer through the KVMover, the token in the
KVHandoff. The DE continues
exactly as one engine would (greedy and seeded output are identical; tested).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace
from opentelemetry.context import Context

from deployments import tracing
from deployments.engine_server import EngineServer
from deployments.protocol import KVHandoff, PrefillJob
from engine.core import EngineCore
from engine.kv_import import PrefixKV
from engine.output import RequestOutput
from engine.request import EngineRequest

logger = logging.getLogger(__name__)


class PrefillError(RuntimeError):
    pass


class PrefillServer(EngineServer):
    role = "prefill"

    async def prefill(self, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        """Yield the first token as soon as it is sampled, then (unless the request already
        finished) the KVHandoff once the KV is with the transport. Traced as `pe.prefill`
        (to the first token) and `kv.send`, under the job's trace context."""
        start = time.perf_counter()
        parent = tracing.extract(job.trace)
        with tracing.span(
            "pe.prefill",
            parent=parent,
            replica=self.replica_id,
            node=self.node_id,
            prompt_tokens=len(job.prompt_token_ids),
            stored_blocks=len(job.prefix_blocks),
            priority=job.priority,
        ) as span:
            first = await self._first_token(job, trace.set_span_in_context(span))
            span.set_attribute("cached_tokens", first.num_cached_tokens)
        prefill_s = time.perf_counter() - start
        kv, first.kv = first.kv, None
        yield first
        if kv is None:
            return
        with tracing.span("kv.send", parent=parent, transport=self.mover.transport.name) as span:
            descriptor = await asyncio.to_thread(self.mover.send, job.request_id, kv)
            span.set_attributes({"bytes": descriptor.num_bytes, "via": descriptor.transport})
        yield KVHandoff(
            request_id=job.request_id,
            token_ids=kv.token_ids,
            block_keys=kv.block_keys,
            output_token_ids=kv.output_token_ids,
            descriptor=descriptor,
            num_de_blocks=kv.num_de_blocks,
            prefill_s=prefill_s,
            send_s=time.perf_counter() - start - prefill_s,
        )

    async def _first_token(self, job: PrefillJob, ctx: Context) -> RequestOutput:
        await self.loop.compile_grammar(job.params)
        prefix = None
        num_de_blocks = job.num_de_blocks
        if job.prefix_blocks:
            with tracing.span("kv.fetch", parent=ctx, blocks=len(job.prefix_blocks)) as span:
                try:
                    blocks = await self.fetch_blocks(job.prefix_blocks)
                    prefix = PrefixKV(list(job.prefix_keys), blocks)
                except Exception as exc:  # their owner (a TrafficManager) died: recompute
                    logger.warning("stored KV of %s lost; recomputing", job.request_id)
                    tracing.fail(span, exc)
                    num_de_blocks = 0  # the DE's own copies may be lost too: send it all

        request = EngineRequest(
            job.request_id,
            job.prompt_token_ids,
            job.params,
            job.tenant_salt,
            prefix=prefix,
            priority=job.priority,
            num_de_blocks=num_de_blocks,
        )

        def add(engine: EngineCore) -> None:
            engine.add_prefill(request)

        hits = len(job.prefix_blocks) * self.engine.config.block_size
        stream = self.loop.submit(
            job.request_id, add, num_tokens=max(1, len(job.prompt_token_ids) - hits), trace=ctx
        )
        first: RequestOutput | None = None
        async for output in stream:
            first = output
        if first is None or (first.kv is None and not first.finished):
            raise PrefillError(f"prefill of {job.request_id} ended without a token")
        return first
