"""EngineCore: add_request / step / abort over one model and one paged KV cache.

step() = schedule -> run -> postprocess; nothing else. A plain class (no Ray), driven by the
prefill and decode deployments, the CLI chat and the tests alike.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from engine.batch_scheduler import BatchScheduler, StepPlan
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.cost_model import attention_work
from engine.errors import InvalidRequestError
from engine.kv_import import ImportStats
from engine.kv_port import KVPort
from engine.loader import engine_model_id, generation_eos_ids
from engine.output import OutputState, RequestOutput, SequenceKV
from engine.request import EngineRequest, check_request
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from engine.spec.policy import SpecStats
from engine.spec.speculator import Speculator
from engine.spec.verify import verify
from engine.structured import GrammarCompiler
from engine.tokenizer import Tokenizer
from kvstore.keys import root_key

logger = logging.getLogger(__name__)


def plan_ids(plan: StepPlan) -> list[str]:
    return [chunk.seq.request_id for chunk in plan.chunks]


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model_config = ModelConfig.from_dir(config.model)
        self.model_id = engine_model_id(config)
        self.max_model_len = config.resolve_max_model_len(self.model_config)
        self.tokenizer = tokenizer or Tokenizer(config.model)
        num_blocks = config.resolve_num_blocks(self.model_config)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = BatchScheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            compute_quota_s=config.prefill_quota_s,
        )
        self.eos_token_ids = {
            *self.tokenizer.eos_token_ids,
            *self.model_config.eos_token_ids,
            *generation_eos_ids(config.model),
        }
        self.runner = ModelRunner(config, self.model_config, num_blocks, sorted(self.eos_token_ids))
        self.kv_port = KVPort(self.block_manager, self.runner.kv_cache)
        self.grammars = GrammarCompiler(
            config.model / "tokenizer.json",
            self.model_config.vocab_size,
            sorted(self.eos_token_ids),
        )
        self.seqs: dict[str, Sequence] = {}
        self.states: dict[str, OutputState] = {}
        self.num_computed_total = 0  # tokens run through the model so far
        self.last_plan: StepPlan | None = None  # the latest step's chunks (for tracing)
        self.import_totals = ImportStats()  # stored-KV imports so far (layer-wise overlap)
        self._arrivals = itertools.count()
        # NOTE: past quant_max_rows rows a quantised engine's matmuls take the dense kernel
        quantised = config.quantization != "none"
        self.speculator = Speculator(
            config.speculative, self.max_model_len, config.quant_max_rows if quantised else None
        )
        logger.info(
            "engine ready",
            extra={
                "model": self.model_id,
                "dtype": config.dtype,
                "num_kv_blocks": num_blocks,
                "block_size": config.block_size,
                "max_model_len": self.max_model_len,
            },
        )

    # ------------------------------------------------------------------ requests
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request (one engine, or the DE side of a PD request with `request.kv`).

        Raises:
            InvalidRequestError: empty/too-long prompt, unknown token ids, duplicate id,
                KV that does not belong to this prompt.
            ValueError: `request.num_de_blocks` set (it is the PE's).
        """
        if request.num_de_blocks:
            raise ValueError("num_de_blocks is the PE's (add_prefill)")
        self._add(request, prefill_only=False)

    def add_prefill(self, request: EngineRequest) -> None:
        """Queue the PE side of a PD request: prefill the prompt, sample the first token with
        the request's own params, then stop. That output carries `kv` (the prompt's KV from
        block `request.num_de_blocks` on and the first token) unless the request already
        finished; `add_request` with that `kv` on the decode engine continues exactly as one
        engine.

        Raises:
            InvalidRequestError: as `add_request`.
            ValueError: `request.kv` or `request.persist_from_block` set (they are the DE's).
        """
        if request.kv is not None or request.persist_from_block is not None:
            raise ValueError("kv and persist_from_block are the DE's (add_request)")
        self._add(request, prefill_only=True)

    def _add(self, request: EngineRequest, prefill_only: bool) -> None:
        params, kv, prefix = request.params, request.kv, request.prefix
        if request.request_id in self.seqs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        check_request(request, self.model_config.vocab_size, self.max_model_len, self.block_manager)
        seq = Sequence(
            request_id=request.request_id,
            token_ids=list(request.prompt_token_ids),
            params=params,
            root_key=root_key(self.model_id, request.tenant_salt),
            prefill_only=prefill_only,
            num_de_blocks=request.num_de_blocks,
            persist_from_block=request.persist_from_block,
            priority=request.priority,
        )
        if prefix is not None and prefix.num_blocks:
            self.kv_port.check_prefix(seq, prefix)
            if kv is None:
                seq.prefix_kv = prefix
        state = OutputState(self.tokenizer, params)
        imported = kv is not None and kv.data is not None
        if kv is not None:
            seq.token_ids.extend(kv.output_token_ids)  # resume after the PE's first token
            if imported:
                self.kv_port.import_kv(seq, kv, prefix)
                self.kv_port.collect_persist(seq)
            elif prefix is not None and prefix.num_blocks:
                seq.prefix_kv = prefix  # resumed without KV: recompute what is not stored
            if kv.output_token_ids:
                # replay what the PE already emitted: stop strings and deltas continue from it
                state.update(list(kv.output_token_ids), finishing=False, check_stop=False)
        if params.grammar is not None:  # resumed sequences continue from what they emitted
            seq.grammar = self.grammars.state(params.grammar, seq.output_token_ids)
        self.seqs[seq.request_id] = seq
        self.states[seq.request_id] = state
        if imported:
            seq.status = SequenceStatus.RUNNING
            self.scheduler.running.append(seq)
        else:  # NOTE: a resumed sequence recomputes prompt + emitted tokens, as after preemption
            self.scheduler.add(seq)

    def can_import(self, num_tokens: int) -> bool:
        """Whether a request of `num_tokens` with imported KV fits now (blocks and batch).

        NOTE: imports wait behind preempted work and keep the scheduler's watermark free, so
        a running decode needing a block does not preempt the import just admitted.
        """
        bm = self.block_manager
        sched = self.scheduler
        return (
            not sched.waiting
            and len(sched.running) < self.config.max_num_seqs
            and bm.num_blocks_for(num_tokens) + sched.watermark_blocks <= bm.num_free_blocks
        )

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False if it is unknown/finished."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def export_kv(self, request_id: str, num_de_blocks: int = 0) -> SequenceKV:
        """Copy out the computed KV of an unfinished request as Full Blocks, from
        `num_de_blocks` on (the receiver holds the blocks before it).

        Raises:
            InvalidRequestError: the request is unknown or already finished.
        """
        seq = self.seqs.get(request_id)
        if seq is None:
            raise InvalidRequestError(f"no unfinished request {request_id!r} to export")
        return self.kv_port.export(seq, num_de_blocks)

    def drain_persist(self) -> list[tuple[bytes, torch.Tensor]]:
        """Full blocks that filled since the last call, as (key, Full Block copy)."""
        return self.kv_port.drain_persist()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one batch step; return what each sampled request produced."""
        started = time.perf_counter()
        self.speculator.draft(self.scheduler.running, len(self.scheduler.waiting))
        plan = self.last_plan = self.scheduler.schedule()
        for seq in self.scheduler.running:
            seq.draft = []  # what fitted is in the plan's chunks
        if plan.is_empty:
            return []
        self.num_computed_total += plan.num_batched_tokens
        run_started = time.perf_counter()
        try:
            sampled, logits = self.runner.run(plan)
        except Exception:
            # NOTE: a failing step must not wedge the engine (it would replan the same chunks
            # forever); its sequences end with "error" and everything else carries on.
            logger.exception("step failed", extra={"request_ids": plan_ids(plan)})
            return [self._fail(chunk.seq) for chunk in plan.chunks]
        self._observe_cost(plan, time.perf_counter() - run_started)
        if self.runner.last_import is not None:
            self.import_totals.add(self.runner.last_import.stats)
        for chunk in plan.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            chunk.seq.prefix_kv = None  # imported (or cached locally): release the source
            self.block_manager.cache_full_blocks(chunk.seq)
            self.kv_port.collect_persist(chunk.seq)
        if logits is None:
            return []
        by_seq = {id(c.seq): c.draft for c in plan.chunks if c.samples}
        drafts = [by_seq[id(seq)] for seq in sampled]
        outputs, accepted = verify(sampled, logits, drafts, self.runner.sampler, self._accept)
        for seq, draft, num_accepted in zip(sampled, drafts, accepted, strict=True):
            if not draft:
                continue
            self.speculator.record(seq, len(draft), num_accepted)
            if num_accepted and not seq.is_finished:
                # NOTE: only now are the accepted positions computed: blocks they fill get
                # keys (and go to the KV store); a rejected position's KV never does.
                self.block_manager.cache_full_blocks(seq)
                self.kv_port.collect_persist(seq)
        if all(c.num_tokens == 1 for c in plan.chunks):
            self.speculator.observe_step(plan.num_batched_tokens, time.perf_counter() - started)
        return outputs

    @property
    def spec_stats(self) -> SpecStats:
        """Speculative decoding so far (drafted, accepted, verify steps)."""
        return self.speculator.stats

    def _accept(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Append one sampled token to `seq` and produce its output (finishing it if due)."""
        seq.token_ids.append(token_id)
        if seq.grammar is not None and not seq.grammar.accept(token_id):
            logger.error(
                "sampled token breaks the grammar",
                extra={"request_id": seq.request_id, "error": seq.grammar.error},
            )
            return self._fail(seq)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        output = self._postprocess(seq, token_id, logprob)
        if seq.prefill_only and not output.finished:
            output.kv = self._hand_off(seq)
        return output

    def _observe_cost(self, plan: StepPlan, seconds: float) -> None:
        """Fit the prefill cost model on steps that are mostly prefill."""
        chunks = [c for c in plan.chunks if c.num_tokens > 1]
        if chunks and sum(c.num_tokens for c in chunks) * 2 > plan.num_batched_tokens:
            work = sum(attention_work(c.start, c.num_tokens) for c in chunks)
            self.scheduler.cost_model.observe(plan.num_batched_tokens, work, seconds)

    def _postprocess(
        self, seq: Sequence, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        p = seq.params
        reason: FinishReason | None = None
        is_stop_token = (token_id in p.stop_token_ids) or (
            token_id in self.eos_token_ids and not p.ignore_eos
        )
        if is_stop_token:  # the sampler masks stop tokens until min_tokens is reached
            reason = FinishReason.STOP
        elif seq.grammar is not None and seq.grammar.is_done:
            reason = FinishReason.STOP  # only end-of-sequence may follow: save that step
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        forced = self._fast_forward(seq) if reason is None else []
        if forced and seq.grammar is not None and seq.grammar.is_done:
            reason = FinishReason.STOP
        elif forced and (
            seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        state = self.states[seq.request_id]
        emit_ids = [] if is_stop_token else [token_id, *forced]
        delta, stop_hit = state.update(
            emit_ids,
            finishing=reason is not None,
            check_stop=seq.num_output_tokens >= p.min_tokens,
        )
        if stop_hit:
            reason = FinishReason.STOP
        logprobs = [logprob] if logprob is not None else []
        return self._emit(seq, [token_id, *forced], delta, reason, logprobs)

    def _fast_forward(self, seq: Sequence) -> list[int]:
        """Append the tokens `seq`'s grammar forces next (they are computed with the next
        step's chunk, not sampled). Not with logprobs: every token must have its own."""
        if seq.grammar is None or not self.config.grammar_fast_forward:
            return []
        if seq.params.logprobs is not None:
            return []
        room = min(
            seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens
        )
        forced = seq.grammar.forced(room)
        seq.token_ids.extend(forced)
        return forced

    def _hand_off(self, seq: Sequence) -> SequenceKV:
        """Export the prompt's KV and the first token, then drop the sequence (PE side)."""
        kv = self.kv_port.export(seq, seq.num_de_blocks)
        kv.output_token_ids = list(seq.output_token_ids)
        self._finish(seq, FinishReason.STOP)
        return kv

    def _fail(self, seq: Sequence) -> RequestOutput:
        return self._emit(seq, [], "", FinishReason.ERROR, [])

    def _emit(
        self,
        seq: Sequence,
        token_ids: list[int],
        delta: str,
        reason: FinishReason | None,
        logprobs: list[TokenLogprob],
    ) -> RequestOutput:
        """This step's output for `seq`; finishes (frees) it when `reason` is set."""
        output = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            new_text=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            new_logprobs=logprobs,
            text=self.states[seq.request_id].text,
            num_drafted_tokens=seq.num_drafted_tokens,
            num_accepted_tokens=seq.num_accepted_tokens,
            num_spec_steps=seq.num_spec_steps,
        )
        if reason is not None:
            self._finish(seq, reason)
        return output

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.speculator.finish(seq)
        del self.seqs[seq.request_id]
        del self.states[seq.request_id]

    # ------------------------------------------------------------------ helpers
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion (offline use, tests); returns one final output each."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        ids = [f"gen-{next(self._arrivals)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
                self.add_request(EngineRequest(rid, prompt, p or SamplingParams()))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        finals: dict[str, RequestOutput] = {}
        # NOTE: outputs of requests added by other callers are not ours to collect here.
        while any(rid in self.seqs for rid in ids):
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        out.new_token_ids = tokens[out.request_id]
                        finals[out.request_id] = out
        missing = [rid for rid in ids if rid not in finals]
        if missing:
            raise RuntimeError(f"requests {missing} were aborted before finishing")
        return [finals[rid] for rid in ids]
