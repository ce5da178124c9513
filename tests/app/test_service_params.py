"""ChatService.params: max_tokens fitted to the context and the server's limit."""

import pytest

from app.api.errors import BadRequestError
from app.api.schemas import CompletionRequest
from app.choice_flow import ModelInfo
from app.service import ChatService

MODEL = ModelInfo("m", max_model_len=100, vocab_size=1000)


def service(default_max_tokens: int, limit: int | None) -> ChatService:
    return ChatService(None, MODEL, None, default_max_tokens, max_tokens_limit=limit)  # type: ignore[arg-type]


def test_the_default_never_exceeds_the_limit():
    """A request without max_tokens gets the default capped at the server's limit (not a
    400 for a number the client never sent), and at the context left after the prompt."""
    request = CompletionRequest(model="m", prompt=[1, 2, 3])
    assert service(512, limit=2).params(request, [1, 2, 3], 0).max_tokens == 2
    assert service(512, limit=None).params(request, [1] * 90, 0).max_tokens == 10
    assert service(8, limit=None).params(request, [1, 2, 3], 0).max_tokens == 8


def test_an_explicit_max_tokens_over_the_limit_is_refused():
    request = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=3)
    with pytest.raises(BadRequestError) as err:
        service(512, limit=2).params(request, [1, 2, 3], 0)
    assert err.value.param == "max_tokens"
