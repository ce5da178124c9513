"""Prompt-lookup drafting: propose what followed the latest earlier copy of the last n tokens.

Agents and editors repeat text they have just read or written (file contents, tool
arguments, the previous answer), so the tokens after the most recent earlier occurrence of
the sequence's last n tokens are a cheap, often-accepted draft. The match runs on a numpy
copy of the sequence, kept per request and grown in place, so a 4,000-token context proposes
in tens of microseconds.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

# NOTE: a safety net for requests whose finish() never comes (an engine crash path);
# the least recently proposed request's array is dropped first.
MAX_CACHED_REQUESTS = 1024


def find_continuation(tokens: np.ndarray, min_n: int, max_n: int, max_tokens: int) -> list[int]:
    """The tokens after the most recent earlier occurrence of the longest matching suffix.

    Args:
        tokens: the whole sequence so far, 1-D integer array.
        min_n: shortest suffix length worth matching.
        max_n: longest suffix length to try; longer matches win over recency.
        max_tokens: the most tokens to return.

    Returns:
        Up to `max_tokens` tokens following the chosen occurrence, or [] when no suffix of
        length in [min_n, max_n] occurs earlier.
    """
    num_tokens = len(tokens)
    max_n = min(max_n, num_tokens - 1)
    if max_tokens <= 0 or max_n < min_n:
        return []
    # Candidate end positions of an earlier copy: equal to the last token, before the last
    # position (the suffix itself is no continuation). Narrow them one token further back
    # per round; survivors stay sorted, so the last one is the most recent copy.
    ends = np.flatnonzero(tokens[: num_tokens - 1] == tokens[num_tokens - 1])
    best_end = int(ends[-1]) if ends.size and min_n <= 1 else -1
    for n in range(1, max_n):
        ends = ends[ends >= n]
        ends = ends[tokens[ends - n] == tokens[num_tokens - 1 - n]]
        if not ends.size:
            break
        if n + 1 >= min_n:
            best_end = int(ends[-1])
    if best_end < 0:
        return []
    return tokens[best_end + 1 : best_end + 1 + max_tokens].tolist()


class NgramDrafter:
    """vLLM's `ngram` method, preferring the most recent occurrence among equal lengths."""

    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n
        # request_id -> (buffer with spare capacity, number of valid tokens in it)
        self._arrays: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()

    def propose(
        self,
        request_id: str,
        tenant: bytes,
        token_ids: list[int],
        num_prompt_tokens: int,
        max_tokens: int,
    ) -> list[int]:
        """Draft up to `max_tokens` tokens to follow `token_ids[-1]` (tenant is unused)."""
        if max_tokens <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = self._tokens(request_id, token_ids)
        return find_continuation(tokens, self.min_n, self.max_n, max_tokens)

    def finish(self, request_id: str, tenant: bytes, output_token_ids: list[int]) -> None:
        """Drop the request's cached array; prompt lookup keeps nothing across requests."""
        self._arrays.pop(request_id, None)

    def num_cached_requests(self) -> int:
        return len(self._arrays)

    def _tokens(self, request_id: str, token_ids: list[int]) -> np.ndarray:
        """A numpy view of `token_ids`, copying only the tokens added since the last call."""
        num_tokens = len(token_ids)
        buf, num_cached = self._arrays.pop(request_id, (None, 0))
        # NOTE: token_ids is append-only per request; a shorter list means the id was reused
        # without finish(), so start over rather than trust the old prefix.
        if buf is None or num_tokens < num_cached:
            buf, num_cached = np.empty(max(64, 2 * num_tokens), dtype=np.int64), 0
        elif num_tokens > len(buf):
            grown = np.empty(2 * num_tokens, dtype=np.int64)
            grown[:num_cached] = buf[:num_cached]
            buf = grown
        if num_tokens > num_cached:
            buf[num_cached:num_tokens] = token_ids[num_cached:]
        self._arrays[request_id] = (buf, num_tokens)
        while len(self._arrays) > MAX_CACHED_REQUESTS:
            self._arrays.popitem(last=False)
        return buf[:num_tokens]
