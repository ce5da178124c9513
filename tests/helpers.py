"""Small builders shared by unit tests."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvstore.keys import root_key

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_seq(token_ids: list[int], rid: str = "r", salt: bytes = b"", **params) -> Sequence:
    return Sequence(
        request_id=rid,
        token_ids=list(token_ids),
        params=SamplingParams(**params),
        root_key=root_key("toy-model", salt),
    )


def chat(engine, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.tokenizer.encode_chat([*messages, {"role": "user", "content": text}])
