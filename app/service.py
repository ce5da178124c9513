"""ChatService: OpenAI requests in, the PD request path, OpenAI objects out. No Ray.

One path for every API shape: prompt (template + tokenise, validated against the model) →
admission (the Gate) → `n` ChoiceFlows, merged → deltas; a formatter per shape
(`app.formats`) turns them into a response or a stream of chunks. The deployments are
reached through a `Cluster`, so tests drive this class with in-process engines and the
Ingress with Serve handles.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.admission.gate import Caller, Gate
from app.admission.queues import Lease, Ticket
from app.api.errors import BadRequestError, model_not_found
from app.api.replies import Cost, Usage
from app.api.responses import GenerateRequest, ResponsesRequest
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.choice_flow import ChoiceFlow, ModelInfo, RecoveryPolicy
from app.choices import Indexed, merge_choices
from app.cluster import Cluster
from app.formats import ChatFormat, CompletionFormat, Head
from app.kv_reads import stored_prefix
from app.logprobs import LogprobFormatter
from app.request_meter import Choice, RequestMeter
from app.responses import Responses
from app.tools import ToolPlan, output_grammar, plan_tools, template_messages
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured import GrammarCompiler, GrammarError
from engine.tokenizer import ChatTemplateError, Tokenizer

Request = GenerateRequest


@dataclass(slots=True)
class _Run:
    """An admitted request with its first output in: what a response or stream is built from."""

    head: Head
    request: ChatCompletionRequest | CompletionRequest  # as run (a Responses one as chat)
    shape: Any  # the formatter (ChatFormat, CompletionFormat, a ResponsesFormat)
    meter: RequestMeter
    lease: Lease | None
    deltas: AsyncIterator[Indexed]


class ChatService:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model: ModelInfo,
        cluster: Cluster,
        default_max_tokens: int,
        gate: Gate | None = None,
        max_tokens_limit: int | None = None,
        recovery: RecoveryPolicy | None = None,
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.cluster = cluster
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit  # the most a request may ask for (400 above)
        self.gate = gate  # admission, limits, billing and audit; None runs every request at once
        self.recovery = recovery or RecoveryPolicy()
        self.replica_losses: collections.Counter[str] = collections.Counter()  # by stage
        self.responses = Responses()  # the Responses API's store of stored responses
        logprobs = LogprobFormatter(tokenizer)
        self.formats: dict[type, Any] = {
            ChatCompletionRequest: ChatFormat(logprobs),
            CompletionRequest: CompletionFormat(logprobs),
        }

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Checks each request's grammar compiles (a 400 before admission); the engines
        compile and cache their own."""
        tok = self.tokenizer
        return GrammarCompiler(
            tok.model_dir / "tokenizer.json", self.model.vocab_size, tok.eos_token_ids
        )

    # ------------------------------------------------------------------ the API
    async def respond(self, request: Request, caller: Caller | None = None) -> Any:
        """The whole response (`chat.completion`, `text_completion` or `response`)."""
        async with self._run(request, caller, stream=False) as run:
            logprobs = _wants_logprobs(run.request)
            choices = [Choice(logprobs=[] if logprobs else None) for _ in range(run.request.n)]
            async for index, out in run.deltas:
                choices[index].add(out)
            usage = self._bill(run.meter, run.lease)
        return run.shape.response(run.head, run.request, choices, usage, run.meter.timings)

    async def stream(self, request: Request, caller: Caller | None = None) -> AsyncIterator[Any]:
        """Chunks as OpenAI sends them: (chat) a role chunk per choice, deltas with a finish
        reason on each choice's last, then (with stream_options.include_usage) one usage
        chunk without choices. Errors before the first token raise before the first chunk."""
        async with self._run(request, caller, stream=True) as run:
            shape, asked = run.shape, run.request
            for chunk in shape.opening(run.head, asked):
                yield chunk
            state = shape.stream_state(asked)
            async for index, out in run.deltas:
                for chunk in _listed(shape.delta(run.head, asked, index, out, state)):
                    yield chunk
            if asked.stream_options and asked.stream_options.include_usage:
                usage = self._bill(run.meter, run.lease)
                for chunk in _listed(shape.usage(run.head, usage, run.meter.timings, state)):
                    yield chunk

    chat = complete = respond
    chat_stream = complete_stream = stream

    # ------------------------------------------------------------------ prompts
    def prompt(
        self, request: ChatCompletionRequest | CompletionRequest, continues: list[int] | None = None
    ) -> list[int]:
        if isinstance(request, ChatCompletionRequest):
            return self.chat_prompt(request, continues)
        return self.completion_prompt(request)

    def tool_plan(self, request: Request) -> ToolPlan:
        """Tools, tool choice and output format, checked; the grammar the output must match.

        Raises:
            BadRequestError: naming the field.
        """
        if unsupported := request.unsupported_fields():
            raise BadRequestError(
                f"{unsupported[0]} is not supported by this server",
                param=unsupported[0],
                code="unsupported_parameter",
            )
        if isinstance(request, ChatCompletionRequest):
            return plan_tools(request)
        return ToolPlan(grammar=output_grammar(ToolPlan(), request.response_format))

    async def check_grammar(self, plan: ToolPlan, request: Request) -> None:
        """Compile the grammar off the event loop (cached): a schema the grammar library
        cannot compile is a 400 naming the field that carried it."""
        if plan.grammar is None:
            return
        try:
            await asyncio.to_thread(self.grammars.compile, plan.grammar)
        except GrammarError as exc:
            param = "tools" if plan.calls_possible else "response_format"
            raise BadRequestError(str(exc), param=param, code="invalid_schema") from exc

    def chat_prompt(
        self, request: ChatCompletionRequest, continues: list[int] | None = None
    ) -> list[int]:
        """The templated prompt; with `continues` (a stored response's prompt + output), the
        stored tokens themselves wherever the rendering extends their text."""
        self._check_model(request.model)
        tools = tuple(request.tools or ())
        messages, extra = template_messages(request.messages, tools, self.tokenizer.renders_tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, **extra)
        except ChatTemplateError as exc:
            raise BadRequestError(str(exc), param="messages", code="invalid_messages") from exc
        if continues:
            stored = self.tokenizer.decode(continues, skip_special_tokens=False)
            if text.startswith(stored):
                return [*continues, *self.tokenizer.encode(text[len(stored) :])]
        return self.tokenizer.encode(text)

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
        self, request: Request, prompt: list[int], index: int, grammar: str | None = None
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
        limit = self.max_tokens_limit
        default = min(self.default_max_tokens, room, limit or room)  # never over the limit
        params = request.sampling_params(default, index)
        if limit is not None and params.max_tokens > limit:
            msg = f"max_tokens is {params.max_tokens}; this server allows at most {limit}"
            raise BadRequestError(msg, param="max_tokens")
        if params.max_tokens > room:
            raise BadRequestError(
                f"max_tokens is {params.max_tokens} but only {room} tokens of the "
                f"{self.model.max_model_len}-token context are left after the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if grammar is not None:
            if params.ignore_eos:
                msg = "ignore_eos cannot be combined with tools or response_format"
                raise BadRequestError(msg, param="ignore_eos", code="unsupported_combination")
            params = params.model_copy(update={"grammar": grammar})
        return params

    # ------------------------------------------------------------------ the one path
    def _bind(self, request: Request, caller: Caller | None) -> tuple[Any, Any]:
        """(the chat or completion request to run, its formatter)."""
        if isinstance(request, ResponsesRequest):
            self._check_model(request.model)
            return self.responses.bind(request, caller.tenant.name if caller else "")
        return request, self.formats[type(request)]

    @contextlib.asynccontextmanager
    async def _run(
        self, request: Request, caller: Caller | None, stream: bool
    ) -> AsyncIterator[_Run]:
        """Prompt → admission → all choices started, the first output in (so planning and
        validation errors reach the client as a status code, before any byte is sent).
        The request holds its place in the engines until the body (its stream's too) ends.

        Whole responses and streams with `every_token` see each output with tokens (their
        ids must all reach the client); other streams only outputs with text, logprobs or a
        finish (not a held-back partial stop string or a special token)."""
        try:
            request, shape = self._bind(request, caller)
            plan = self.tool_plan(request)
            await self.check_grammar(plan, request)
            prompt = self.prompt(request, shape.continues)
            params = [self.params(request, prompt, i, plan.grammar) for i in range(request.n)]
            shape.note_prompt(prompt)
        except Exception as exc:
            if self.gate is not None and caller is not None:
                # never admitted: the gate's one audit line for it
                self.gate.refuse(caller.request_id, caller.route, caller.tenant, exc)
            raise
        rid = caller.request_id if caller else uuid.uuid4().hex
        meter = RequestMeter(len(prompt), len(params))
        async with self._admitted(caller, prompt, params, request.user, meter) as lease:
            salt = caller.tenant.salt if caller else b""
            flows = [
                self.run(f"{rid}-{i}" if len(params) > 1 else rid, prompt, p, salt, lease)
                for i, p in enumerate(params)
            ]
            outputs = merge_choices(flows)
            try:
                first = await anext(outputs, None)
                head = Head(
                    id=f"{shape.id_prefix}{rid}",
                    created=int(time.time()),
                    model=self.model.name,
                    service_tier=lease.tier if lease else None,
                )
                every_token = not stream or shape.every_token(request)
                deltas = _deltas(first, outputs, meter, lease, every_token)
                yield _Run(head, request, shape, meter, lease, deltas)
            finally:
                await outputs.aclose()

    @contextlib.asynccontextmanager
    async def _admitted(
        self,
        caller: Caller | None,
        prompt: list[int],
        params: list[SamplingParams],
        user: str | None,
        meter: RequestMeter,
    ) -> AsyncIterator[Lease | None]:
        """Hold a place in the engines for the request's whole life (its stream's too)."""
        if self.gate is None or caller is None:
            yield None
            return
        hits, read_bytes = await stored_prefix(self.cluster, self.model, prompt, caller.tenant.salt)
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
        async with self.gate.enter(caller.tenant, ticket, meter) as lease:
            meter.admitted(lease.queued_s)
            yield lease

    def run(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: bytes = b"",
        lease: Lease | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One choice's outputs (its ChoiceFlow)."""
        return ChoiceFlow(
            self.cluster,
            self.model,
            request_id,
            prompt,
            params,
            salt,
            priority=lease.rank if lease else 0,
            recovery=self.recovery,
            losses=self.replica_losses,
            on_loaded=lease.read_done if lease else None,
        ).run()

    def _bill(self, meter: RequestMeter, lease: Lease | None) -> Usage:
        usage = meter.usage()
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


def _listed(chunks: Any) -> list[Any]:
    """A formatter's answer as a list: None (nothing to send), one chunk, or several."""
    if chunks is None:
        return []
    return chunks if isinstance(chunks, list) else [chunks]


def _wants_logprobs(request: ChatCompletionRequest | CompletionRequest) -> bool:
    if isinstance(request, ChatCompletionRequest):
        return request.logprobs
    return request.logprobs is not None


async def _deltas(
    first: Indexed | None,
    rest: AsyncIterator[Indexed],
    meter: RequestMeter,
    lease: Lease | None,
    every_token: bool,
) -> AsyncIterator[Indexed]:
    """The outputs worth a delta; every output is metered, and the first one tells admission
    the prompt has left the prefill queue."""
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        item = first
        while item is not None:
            index, out = item
            meter.note(index, out)
            if lease is not None:
                lease.prefill_done()
            has_tokens = every_token and out.new_token_ids
            if out.new_text or out.finished or out.new_logprobs or has_tokens:
                yield index, out
            item = await anext(rest, None)
