"""Engine TokenLogprobs → OpenAI's two logprob shapes (chat `content`, legacy completions)."""

from __future__ import annotations

from app.api.replies import ChoiceLogprobs, CompletionLogprobs, TokenLogprobOut, TopLogprob
from engine.sequence import TokenLogprob
from engine.tokenizer import Tokenizer


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat(self, logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if logprobs is None:
            return None
        content = []
        for lp in logprobs:
            token = self.token(lp.token_id)
            top = [
                TopLogprob(token=(t := self.token(i)), logprob=v, bytes=list(t.encode()))
                for i, v in lp.top
            ]
            content.append(
                TokenLogprobOut(
                    token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top
                )
            )
        return ChoiceLogprobs(content=content)

    def completion(self, logprobs: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = 0
        for lp in logprobs:
            token = self.token(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.token(i): v for i, v in lp.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out
