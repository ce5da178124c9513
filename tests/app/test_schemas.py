"""OpenAI wire format: requests validate like the API, responses parse with the openai SDK."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from app.api import replies as r
from app.api import schemas as s
from app.api.errors import to_api_error
from app.api.sse import DONE_FRAME, sse_frame
from app.tools import template_messages

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _chat(**kw) -> s.ChatCompletionRequest:
    return s.ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, **kw})


def test_openai_client_body_parses_and_maps_to_engine_params():
    req = _chat(
        temperature=0.2,
        top_p=0.9,
        max_completion_tokens=33,
        max_tokens=99,
        seed=5,
        stop="\n\n",
        logprobs=True,
        top_logprobs=3,
        stream=True,
        stream_options={"include_usage": True},
        user="u1",
        store=False,
    )
    p = req.sampling_params(default_max_tokens=256)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.stop, p.logprobs) == (
        0.2,
        0.9,
        33,
        5,
        ["\n\n"],
        3,
    )
    assert req.ignored_fields() == ["store"]
    assert template_messages(req.messages, (), native=False)[0] == MSGS


def test_defaults_follow_openai():
    p = _chat().sampling_params(default_max_tokens=128)
    assert (p.temperature, p.top_p, p.max_tokens, p.logprobs) == (1.0, 1.0, 128, None)


def test_n_choices_get_distinct_derived_seeds():
    req = _chat(n=3, seed=10)
    assert [req.sampling_params(16, i).seed for i in range(3)] == [10, 11, 12]


def test_text_content_parts_are_joined():
    req = s.ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        }
    )
    messages, _ = template_messages(req.messages, (), native=False)
    assert messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 99}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": "2"}, "n"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": 1}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_bad_values_become_400_naming_the_field(body, param):
    with pytest.raises(ValidationError) as info:
        _chat(**body)
    err = to_api_error(info.value)
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param.startswith(param)


def test_whole_floats_are_integers_as_in_json_schema():
    """JSON Schema's `integer` includes 2.0, so the schema-valid body is accepted as 2."""
    req = _chat(n=2.0, max_tokens=3.0)
    assert (req.n, req.max_tokens) == (2, 3)
    with pytest.raises(ValidationError):
        _chat(n=1.5)


@pytest.mark.parametrize("body", [{"top_logprobs": 2}, {"stream_options": {"include_usage": True}}])
def test_cross_field_rules(body):
    with pytest.raises(ValidationError):
        _chat(**body)


def test_completion_request_rules():
    req = s.CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "logprobs": 2})
    assert req.sampling_params(8).logprobs == 2
    for bad in (
        {"prompt": ""},
        {"prompt": []},
        {"prompt": "x", "echo": True},
        {"prompt": "x", "logprobs": 6},
    ):
        with pytest.raises(ValidationError):
            s.CompletionRequest.model_validate({"model": "m", **bad})


def test_usage_carries_openai_and_deepseek_cache_fields():
    usage = r.Usage.of(prompt_tokens=100, completion_tokens=7, cached_tokens=64)
    assert usage.total_tokens == 107
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_cache_hit_tokens == 64
    assert usage.prompt_cache_miss_tokens == 36


def test_chat_response_and_chunk_parse_with_the_openai_sdk():
    usage = r.Usage.of(10, 2, 0)
    top = [r.TopLogprob(token="Hi", logprob=-0.1)]
    token = r.TokenLogprobOut(token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=top)
    logprobs = r.ChoiceLogprobs(content=[token])
    resp = r.ChatCompletionResponse(
        model="m",
        usage=usage,
        choices=[
            r.ChatChoice(
                index=0,
                message=r.AssistantMessage(content="Hi!"),
                finish_reason="stop",
                logprobs=logprobs,
            )
        ],
    )
    parsed = ChatCompletion.model_validate(r.dump(resp))
    assert parsed.choices[0].message.content == "Hi!"
    assert parsed.usage.prompt_tokens_details.cached_tokens == 0
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].token == "Hi"
    chunk = r.ChatCompletionChunk(
        id=resp.id,
        created=resp.created,
        model="m",
        choices=[r.ChunkChoice(index=0, delta=r.DeltaMessage(role="assistant", content="H"))],
    )
    assert ChatCompletionChunk.model_validate(r.dump(chunk)).choices[0].delta.content == "H"
    usage_chunk = r.ChatCompletionChunk(
        id=resp.id, created=resp.created, model="m", choices=[], usage=usage
    )
    assert ChatCompletionChunk.model_validate(r.dump(usage_chunk)).usage.total_tokens == 12


def test_completion_and_model_list_parse_with_the_openai_sdk():
    resp = r.CompletionResponse(
        model="m",
        usage=r.Usage.of(3, 1, 0),
        choices=[r.CompletionChoice(index=0, text="x", finish_reason="length")],
    )
    assert Completion.model_validate(r.dump(resp)).choices[0].text == "x"
    card = r.ModelList(data=[r.ModelCard(id="SmolLM2", max_model_len=8192)]).data[0]
    assert Model.model_validate(r.dump(card)).id == "SmolLM2"


def test_sse_frames():
    frame = sse_frame(r.DeltaMessage(content="hé"))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {"content": "hé"}
    assert DONE_FRAME == b"data: [DONE]\n\n"


def test_finish_reasons_on_the_wire_are_the_engine_ones_and_tool_calls():
    from typing import get_args

    from engine.sequence import FinishReason

    engine = {reason.value for reason in FinishReason}
    assert set(get_args(r.FinishReasonName)) == engine | {"tool_calls"}
