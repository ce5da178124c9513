"""Turn a batch of logits into next tokens, one set of SamplingParams per row.

Order per row: penalties -> grammar mask (structured rows only) -> (greedy | temperature ->
top-k -> top-p -> draw). Logprobs are reported from the model's raw distribution (before
penalties, grammar and temperature), as the OpenAI API does. A row with a seed draws from
a generator seeded by (seed, output position), so its tokens depend neither on what else
shares the batch nor on which engine drew the earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence, TokenLogprob
from engine.structured import apply_bitmask, bitmask_words


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, seed: int = 0, eos_token_ids: list[int] | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.eos_token_ids = list(eos_token_ids or [])

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """Sample one token per row of `logits` [B, V] (float32) for the matching `seqs`."""
        raw = logits
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_grammars(raw, logits, seqs)
        greedy = torch.tensor([s.params.is_greedy for s in seqs])
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().flatten().tolist()
            sampled = self._sample_rows(logits[rows], [seqs[i] for i in rows])
            token_ids[rows] = sampled
        token_list = token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            for row, i in enumerate(want):
                chosen = token_list[i]
                top_n = seqs[i].params.logprobs or 0
                top = lp[row].topk(top_n) if top_n else None
                logprobs[i] = TokenLogprob(
                    token_id=chosen,
                    logprob=float(lp[row, chosen]),
                    top=list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                    if top is not None
                    else [],
                )
        return SampleResult(token_list, logprobs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties and s.num_output_tokens]
        early = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not rows and not early:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i in early:  # min_tokens: no stop token may be drawn yet
            p = seqs[i].params
            stop_ids = [*p.stop_token_ids, *([] if p.ignore_eos else self.eos_token_ids)]
            logits[i, [t for t in stop_ids if t < vocab]] = float("-inf")
        for i in rows:
            p = seqs[i].params
            counts = torch.bincount(torch.tensor(seqs[i].output_token_ids), minlength=vocab)
            counts = counts[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    def _apply_grammars(
        self, raw: torch.Tensor, logits: torch.Tensor, seqs: list[Sequence]
    ) -> torch.Tensor:
        """Mask what each structured row's grammar forbids; other rows are not touched.

        NOTE: min_tokens may forbid the only token the grammar allows (end of sequence once
        the output is complete): the grammar wins, so such a row is masked from `raw`.
        """
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return logits
        bitmask = torch.full((len(rows), bitmask_words(logits.shape[-1])), -1, dtype=torch.int32)
        for row, i in enumerate(rows):
            seqs[i].grammar.fill(bitmask, row)  # type: ignore[union-attr]
        constrained = ~(bitmask == -1).all(dim=1)  # free-text rows allow every token
        if not bool(constrained.any()):
            return logits
        rows = [i for i, c in zip(rows, constrained.tolist(), strict=True) if c]
        bitmask = bitmask[constrained]
        masked = logits[rows]  # a copy: the caller's logits stay as they were
        apply_bitmask(masked, bitmask)
        dead = torch.isinf(masked).all(dim=-1) & ~torch.isinf(raw[rows]).all(dim=-1)
        if bool(dead.any()):
            again = raw[rows][dead]
            apply_bitmask(again, bitmask[dead])
            masked[dead] = again
        if logits is raw:
            logits = logits.clone()
        logits[rows] = masked
        return logits

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
        logits = logits / temps.unsqueeze(1)
        top_k = [s.params.top_k for s in seqs]
        if any(top_k):
            vocab = logits.shape[-1]
            k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k])
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)
        if bool((top_p < 1.0).any()):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass strictly before it already reaches top_p
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
            drop[:, 0] = False  # the likeliest token always stays (a top_p of 5e-324 is 0 here)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        out = torch.empty(len(seqs), dtype=torch.long)
        for i, seq in enumerate(seqs):
            gen = seq.next_token_generator() or self.generator
            out[i] = torch.multinomial(probs[i], 1, generator=gen)
        return out
