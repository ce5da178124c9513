"""DecodeServer: receive a request's prompt KV, then decode it in the continuous batch.

The KV arrives through the KVMover (off the engine thread), merged with the hit blocks this
node read itself (DE-read path: handles into this node's DRAM buffer); if the transfer fails,
the DE resumes from the PE's first token and recomputes the KV (policy
`transfer.on_failure`: recompute | fail), never importing partial KV; the engine thread
imports it when blocks and a batch slot are free (arrival order), resumes from the PE's
first token, and streams every later output. Every full block not yet
stored (the prompt's new blocks, then each block that fills while decoding) goes to this
node's KV store. Leaving the stream early aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch
from opentelemetry import trace
from opentelemetry.context import Context

from deployments import tracing
from deployments.engine_server import EngineServer
from deployments.options import KVFailurePolicy
from deployments.protocol import DecodeJob
from engine.core import EngineCore
from engine.kv_import import PrefixKV
from engine.output import RequestOutput, SequenceKV
from engine.request import EngineRequest

logger = logging.getLogger(__name__)


class DecodeServer(EngineServer):
    role = "decode"

    async def generate(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        """Traced as `de.decode` (receive, import wait, decode) under the job's context."""
        span = tracing.start_span(
            "de.decode",
            tracing.extract(job.trace),
            replica=self.replica_id,
            node=self.node_id,
            prompt_tokens=len(job.prompt_token_ids),
        )
        ctx = trace.set_span_in_context(span)
        tokens = 0
        try:
            await self.loop.compile_grammar(job.params)
            kv, prefix = await self._receive(job, ctx)
            num_tokens = len(job.prompt_token_ids) + (len(kv.output_token_ids) if kv else 0)
            persist_from = job.num_stored_blocks if self.persist is not None else None

            request = EngineRequest(
                job.request_id,
                job.prompt_token_ids,
                job.params,
                job.tenant_salt,
                prefix=prefix,
                kv=kv,
                persist_from_block=persist_from,
            )

            def add(engine: EngineCore) -> None:
                engine.add_request(request)

            def ready(engine: EngineCore) -> bool:
                return engine.can_import(num_tokens)

            stream = self.loop.submit(
                job.request_id,
                add,
                ready=ready if kv is not None and kv.data is not None else None,
                num_tokens=num_tokens,
                trace=ctx,
            )
            async for output in stream:
                tokens += len(output.new_token_ids)
                yield output
        except BaseException as exc:
            tracing.fail(span, exc)
            raise
        finally:
            span.set_attribute("output_tokens", tokens)
            span.end()

    async def _receive(
        self, job: DecodeJob, ctx: Context
    ) -> tuple[SequenceKV | None, PrefixKV | None]:
        """The PE's KV (through the KVMover) and this node's own hit blocks, together."""
        handoff = job.handoff
        if handoff is None:  # moved off a lost replica: recompute prompt + emitted tokens
            if not job.emitted:
                return None, None
            prompt = list(job.prompt_token_ids)
            return SequenceKV(prompt, [], None, output_token_ids=list(job.emitted)), None

        async def fetch() -> list[torch.Tensor]:  # this node's own reads, while KV arrives
            if not job.prefix_blocks:
                return []
            with tracing.span("kv.fetch", parent=ctx, blocks=len(job.prefix_blocks)):
                return await self.fetch_blocks(job.prefix_blocks)

        blocks_task = asyncio.ensure_future(fetch())
        data: torch.Tensor | None = None
        self.mover.hold(handoff.descriptor)  # renews the PE's lease until a thread reads it
        try:
            with tracing.span("kv.receive", parent=ctx, bytes=handoff.descriptor.num_bytes):
                data = await asyncio.to_thread(self.mover.receive, handoff.descriptor)
        except Exception:
            self.num_transfer_failures += 1
            if self.on_transfer_failure != KVFailurePolicy.RECOMPUTE:
                blocks_task.cancel()
                raise
            # NOTE: never partial KV: resume from the PE's tokens instead,
            # and recompute the prompt's KV here (from this node's own stored blocks on)
            logger.warning("KV transfer of %s failed; recomputing", job.request_id, exc_info=True)
        except BaseException:  # cancelled: the PE may free its pages now, not a lease later
            blocks_task.cancel()
            self.mover.release(handoff.descriptor)
            raise
        finally:
            self.mover.unhold(handoff.descriptor)
        try:
            blocks = await blocks_task
        except Exception:  # their owner (a TrafficManager) died: recompute, as above
            if self.on_transfer_failure != KVFailurePolicy.RECOMPUTE:
                raise
            logger.warning("stored KV of %s lost; recomputing", job.request_id, exc_info=True)
            blocks, data = [], None
        kv = SequenceKV(
            handoff.token_ids,
            handoff.block_keys,
            data,
            output_token_ids=handoff.output_token_ids,
            num_de_blocks=handoff.num_de_blocks,
        )
        prefix = PrefixKV(handoff.block_keys[: len(blocks)], blocks) if blocks else None
        return kv, prefix
