"""Error mapping: the OpenAI envelope, the right status, no internals leaked."""

from __future__ import annotations

from app.api.errors import (
    BadRequestError,
    OverloadedError,
    RateLimitError,
    model_not_found,
    to_api_error,
)
from engine.errors import InvalidRequestError


def test_envelope_has_all_four_fields():
    body = BadRequestError("bad", param="x", code="c").body()
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}
    }


def test_engine_context_error_is_a_400_with_its_code():
    err = to_api_error(
        InvalidRequestError("too long", param="messages", code="context_length_exceeded")
    )
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")


def test_unknown_model_is_404():
    err = model_not_found("gpt-9")
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")


def test_overload_and_rate_limit_statuses_and_headers():
    assert OverloadedError("busy", headers={"Retry-After": "2"}).status == 503
    err = RateLimitError("slow down", headers={"Retry-After": "5"})
    assert err.status == 429 and err.headers["Retry-After"] == "5"


def test_unexpected_exception_is_500_without_leaking_details():
    err = to_api_error(KeyError("/secret/path/to/weights"))
    assert err.status == 500
    assert "secret" not in err.message and err.code == "internal_error"
