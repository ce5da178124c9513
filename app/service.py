"""ChatService: OpenAI requests in, the PD request path, OpenAI responses out. No Ray.

One request's way: template + tokenise → validate against the model → for each of `n`
choices: Scheduler.plan → PE.prefill (prompt KV + first token) → DE.generate (the rest,
streamed) → response objects. The deployments are reached through a `Backend`, so unit tests can
drive this class with in-process engines and the Ingress shell with Serve handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from app.admission.gate import Caller, Gate
from app.admission.queues import Lease, Ticket
from app.api.errors import BadRequestError, model_not_found
from app.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Cost,
    DeltaMessage,
    Timings,
    Usage,
)
from app.flow import Backend, ModelInfo, run_request, stored_prefix
from app.logprobs import LogprobFormatter
from app.tally import Choice, Tally
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatTemplateError, Tokenizer


class ChatService:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model: ModelInfo,
        backend: Backend,
        default_max_tokens: int,
        gate: Gate | None = None,
        max_tokens_limit: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.logprobs = LogprobFormatter(tokenizer)
        self.model = model
        self.backend = backend
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit  # the most a request may ask for (400 above)
        self.gate = gate  # admission, limits and billing; None runs every request at once

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        self._check_model(request.model)
        try:
            return self.tokenizer.encode_chat(request.template_messages())
        except ChatTemplateError as exc:
            raise BadRequestError(str(exc), param="messages", code="invalid_messages") from exc

    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        self._check_model(request.model)
        if isinstance(request.prompt, str):
            return self.tokenizer.encode(request.prompt)
        if min(request.prompt) < 0 or max(request.prompt) >= self.model.vocab_size:
            raise BadRequestError(
                f"prompt token ids must be in [0, {self.model.vocab_size})", param="prompt"
            )
        return list(request.prompt)

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise model_not_found(name)

    def params(
        self, request: ChatCompletionRequest | CompletionRequest, prompt: list[int], index: int
    ) -> SamplingParams:
        """Sampling params for choice `index`, with max_tokens fitted to the context."""
        room = self.model.max_model_len - len(prompt)
        if room <= 0:
            raise BadRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.model.max_model_len} tokens including the reply",
                param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        params = request.sampling_params(min(self.default_max_tokens, room), index)
        if (limit := self.max_tokens_limit) is not None and params.max_tokens > limit:
            msg = f"max_tokens is {params.max_tokens}; this server allows at most {limit}"
            raise BadRequestError(msg, param="max_tokens")
        if params.max_tokens > room:
            raise BadRequestError(
                f"max_tokens is {params.max_tokens} but only {room} tokens of the "
                f"{self.model.max_model_len}-token context are left after the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return params

    # ------------------------------------------------------------------ admission
    @contextlib.asynccontextmanager
    async def _admitted(
        self,
        caller: Caller | None,
        prompt: list[int],
        params: list[SamplingParams],
        user: str | None = None,
    ) -> AsyncIterator[Lease | None]:
        """Hold a place in the engines for the request's whole life (its stream's too)."""
        if self.gate is None or caller is None:
            yield None
            return
        hits, read_bytes = await stored_prefix(self.backend, self.model, prompt, _salt(caller))
        ticket = Ticket(
            caller.request_id,
            caller.tenant.name,
            caller.tier,
            len(prompt),
            max(p.max_tokens for p in params),
            len(params),
            hits,
            read_bytes,
            route=caller.route,
            user=user,
        )
        async with self.gate.enter(caller.tenant, ticket) as lease:
            yield lease

    def _bill(self, usage: Usage, lease: Lease | None) -> Usage:
        if self.gate is not None and lease is not None:
            hit, miss = usage.prompt_cache_hit_tokens, usage.prompt_cache_miss_tokens
            charge = self.gate.charge(lease, hit, miss, usage.completion_tokens)
            usage.cost = Cost(
                amount=charge.amount,
                currency=charge.currency,
                window=charge.window,
                multiplier=charge.multiplier,
                service_tier=lease.tier,
            )
        return usage

    # ------------------------------------------------------------------ the PD path
    def run(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: bytes = b"",
        lease: Lease | None = None,
    ) -> AsyncIterator[RequestOutput]:
        rank, loaded = (lease.rank, lease.read_done) if lease is not None else (0, None)
        return run_request(self.backend, self.model, request_id, prompt, params, salt, rank, loaded)

    async def _choices(
        self,
        prompt: list[int],
        params: list[SamplingParams],
        salt: bytes,
        lease: Lease | None = None,
        base: str = "",
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run all choices concurrently; yield (index, output) as they come. The engines know
        choice i as `<base>-i` (`<base>` alone when n = 1)."""
        base = base or uuid.uuid4().hex
        if len(params) == 1:
            outputs = self.run(base, prompt, params[0], salt, lease)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    yield 0, output
            return
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(index: int, p: SamplingParams) -> None:
            try:
                async for output in self.run(f"{base}-{index}", prompt, p, salt, lease):
                    await queue.put((index, output))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(
        self,
        prompt: list[int],
        params: list[SamplingParams],
        caller: Caller | None,
        lease: Lease | None,
        rid: str,
    ) -> tuple[list[Choice], Usage, Timings]:
        choices = [Choice(logprobs=[] if p.logprobs is not None else None) for p in params]
        tally = Tally(len(prompt), len(params), lease)
        outputs = self._choices(prompt, params, _salt(caller), lease, rid)
        async for index, out in outputs:
            tally.note(index, out)
            choice = choices[index]
            choice.text += out.new_text
            choice.token_ids += out.new_token_ids
            if choice.logprobs is not None:
                choice.logprobs.extend(out.new_logprobs)
            if out.finished:
                choice.finish_reason = out.finish_reason
        return choices, self._bill(tally.usage(), lease), tally.timings

    async def _deltas(
        self,
        prompt: list[int],
        params: list[SamplingParams],
        caller: Caller | None,
        lease: Lease | None,
        rid: str,
        every_token: bool = False,
    ) -> tuple[Tally, AsyncIterator[tuple[int, RequestOutput]]]:
        """Start all choices and wait for the first output; then the outputs worth a chunk
        (with `every_token`, each output with tokens: their ids must all reach the client).

        NOTE: awaiting the first output before the caller yields anything makes planning and
        validation errors reach the client before any byte is sent (a proper status code).
        """
        tally = Tally(len(prompt), len(params), lease)
        outputs = self._choices(prompt, params, _salt(caller), lease, rid)
        first = await anext(outputs, None)

        async def deltas() -> AsyncIterator[tuple[int, RequestOutput]]:
            async for index, out in _prepend(first, outputs):
                tally.note(index, out)
                if (
                    out.new_text
                    or out.finished
                    or out.new_logprobs
                    or (every_token and out.new_token_ids)
                ):
                    yield index, out  # else: held back (partial stop string), special token

        return tally, deltas()

    # ------------------------------------------------------------------ chat
    async def chat(
        self, request: ChatCompletionRequest, caller: Caller | None = None
    ) -> ChatCompletionResponse:
        prompt, rid = self.chat_prompt(request), _rid(caller)
        params = [self.params(request, prompt, i) for i in range(request.n)]
        async with self._admitted(caller, prompt, params, request.user) as lease:
            choices, usage, timings = await self._collect(prompt, params, caller, lease, rid)
        return ChatCompletionResponse(
            id=f"chatcmpl-{rid}",
            timings=timings,
            model=self.model.name,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=self.logprobs.chat(c.logprobs),
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
            service_tier=lease.tier if lease else None,
        )

    async def chat_stream(
        self, request: ChatCompletionRequest, caller: Caller | None = None
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as OpenAI sends them: a role chunk per choice, deltas, a finish chunk per
        choice, then (with stream_options.include_usage) one usage chunk without choices."""
        prompt, rid = self.chat_prompt(request), _rid(caller)
        params = [self.params(request, prompt, i) for i in range(request.n)]
        async with self._admitted(caller, prompt, params, request.user) as lease:
            head = {
                "id": f"chatcmpl-{rid}",
                "created": int(time.time()),
                "model": self.model.name,
                "service_tier": lease.tier if lease else None,
            }
            tally, deltas = await self._deltas(prompt, params, caller, lease, rid)
            for i in range(request.n):
                yield ChatCompletionChunk(
                    **head, choices=[ChunkChoice(index=i, delta=DeltaMessage(role="assistant"))]
                )
            async for index, out in deltas:
                yield ChatCompletionChunk(
                    **head,
                    choices=[
                        ChunkChoice(
                            index=index,
                            delta=DeltaMessage(content=out.new_text or None),
                            finish_reason=out.finish_reason if out.finished else None,
                            logprobs=self.logprobs.chat(out.new_logprobs)
                            if params[index].logprobs is not None
                            else None,
                        )
                    ],
                )
            if request.stream_options and request.stream_options.include_usage:
                usage = self._bill(tally.usage(), lease)
                yield ChatCompletionChunk(**head, choices=[], usage=usage, timings=tally.timings)

    # ------------------------------------------------------------------ completions
    async def complete(
        self, request: CompletionRequest, caller: Caller | None = None
    ) -> CompletionResponse:
        prompt, rid = self.completion_prompt(request), _rid(caller)
        params = [self.params(request, prompt, i) for i in range(request.n)]
        async with self._admitted(caller, prompt, params, request.user) as lease:
            choices, usage, timings = await self._collect(prompt, params, caller, lease, rid)
        return CompletionResponse(
            id=f"cmpl-{rid}",
            timings=timings,
            model=self.model.name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=self.logprobs.completion(c.logprobs),
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
            service_tier=lease.tier if lease else None,
        )

    async def complete_stream(
        self, request: CompletionRequest, caller: Caller | None = None
    ) -> AsyncIterator[CompletionResponse]:
        prompt, rid = self.completion_prompt(request), _rid(caller)
        params = [self.params(request, prompt, i) for i in range(request.n)]
        async with self._admitted(caller, prompt, params, request.user) as lease:
            head = {
                "id": f"cmpl-{rid}",
                "created": int(time.time()),
                "model": self.model.name,
                "service_tier": lease.tier if lease else None,
            }
            tally, deltas = await self._deltas(
                prompt, params, caller, lease, rid, request.return_token_ids
            )
            async for index, out in deltas:
                yield CompletionResponse(
                    **head,
                    choices=[
                        CompletionChoice(
                            index=index,
                            text=out.new_text,
                            finish_reason=out.finish_reason if out.finished else None,
                            logprobs=self.logprobs.completion(out.new_logprobs)
                            if params[index].logprobs is not None
                            else None,
                            token_ids=out.new_token_ids if request.return_token_ids else None,
                        )
                    ],
                )
            if request.stream_options and request.stream_options.include_usage:
                usage = self._bill(tally.usage(), lease)
                yield CompletionResponse(**head, choices=[], usage=usage, timings=tally.timings)


def _rid(caller: Caller | None) -> str:
    """The request's id: response ids, engine request ids, audit line and trace share it."""
    return caller.request_id if caller else uuid.uuid4().hex


def _salt(caller: Caller | None) -> bytes:
    return caller.tenant.salt if caller else b""


async def _prepend(
    first: tuple[int, RequestOutput] | None, rest: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        if first is not None:
            yield first
        async for item in rest:
            yield item
