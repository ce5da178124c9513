"""Chat template and incremental detokenisation on the real default tokenizer."""

from __future__ import annotations

import pytest

from engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.model

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "ünïcødé 🚀 中文"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(model_dir, tokenizer, messages):
    """Our jinja rendering is the same string transformers renders from the same files."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.encode_chat(messages) == hf(expected, add_special_tokens=False)["input_ids"]


def test_eos_is_the_chat_end_token(tokenizer):
    assert tokenizer.decode(tokenizer.eos_token_ids, skip_special_tokens=False) == "<|im_end|>"


def test_template_errors_are_value_errors(tokenizer):
    tokenizer_copy = Tokenizer.__new__(Tokenizer)
    tokenizer_copy.__dict__.update(tokenizer.__dict__)
    tokenizer_copy.chat_template = "{{ raise_exception('bad roles') }}"
    tokenizer_copy._compiled = None
    with pytest.raises(ChatTemplateError, match="bad roles"):
        tokenizer_copy.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii words, then more words.",
        "emoji 🚀🔥 and accents éàü, CJK 中文字符, combining e\u0301",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters and 👩‍👩‍👧 family",
    ],
)
def test_streaming_deltas_never_split_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
