"""The HTTP edge's contract: /openapi.json states what the routes really accept and answer
(schemathesis fuzzes the app against it, tests/integration/test_fuzz.py), and unknown routes
and methods answer in the OpenAI error shape, 405 with `Allow`."""

from __future__ import annotations

import datetime
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from schemathesis.generation import GenerationMode

from app.api.errors import (
    AuthenticationError,
    ErrorResponse,
    KVLoadFailed,
    OverloadedError,
    model_not_found,
    to_api_error,
)
from app.api.http import BODIES, OPERATIONS, install_error_handlers, openapi_with_bodies
from app.api.replies import (
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from app.api.responses import ResponsesRequest
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.api.sse import DONE_FRAME, sse_frame

MODEL, MAX_TOKENS_LIMIT, VOCAB_SIZE = "m", 2, 100
EXAMPLES = settings(
    max_examples=60, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


async def _route(http: Request) -> None:
    """Stands in for the ingress's routes: the document is built from the paths alone."""


def _api() -> FastAPI:
    api = FastAPI(title="dualpath-serve")
    install_error_handlers(api)
    for path in OPERATIONS:
        api.add_api_route(path, _route, methods=["POST" if path in BODIES else "GET"])
    api.openapi = openapi_with_bodies(api, [MODEL], MAX_TOKENS_LIMIT, VOCAB_SIZE)  # type: ignore[method-assign]
    return api


@pytest.fixture(scope="module")
def spec() -> Any:
    return schemathesis.openapi.from_dict(_api().openapi())


def _server_accepts(path: str, body: Any) -> bool:
    """The server's rules for a body: JSON object (app/api/http.py read_json), the pydantic
    model, then ChatService's: the served model, max_tokens within the limit, prompt token
    ids in the vocabulary."""
    if not isinstance(body, dict):
        return False
    try:
        request = BODIES[path].model_validate(body)
    except ValidationError:
        return False
    prompt = getattr(request, "prompt", "")
    ids = [] if isinstance(prompt, str) else prompt
    if isinstance(request, ResponsesRequest):
        max_tokens = request.max_output_tokens or 0
    else:
        max_tokens = request.sampling_params(MAX_TOKENS_LIMIT).max_tokens
    return (
        request.model == MODEL
        and max_tokens <= MAX_TOKENS_LIMIT
        and all(0 <= i < VOCAB_SIZE for i in ids)
    )


def _response(status: int, path: str, **kw: Any) -> httpx.Response:
    response = httpx.Response(status, request=httpx.Request("POST", f"http://t{path}"), **kw)
    response.elapsed = datetime.timedelta(0)  # as if sent: schemathesis reads it
    return response


def test_every_operation_lists_its_error_statuses_with_the_openai_error_schema():
    """Each route documents every status it answers (a client or fuzzer meeting an
    undocumented one is a contract break), and every error status carries the OpenAI
    error body."""
    doc = _api().openapi()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert sorted(chat) == ["200", "400", "401", "403", "404", "408", "413", "429", "503"]
    assert sorted(doc["paths"]["/v1/models"]["get"]["responses"]) == ["200", "401"]
    assert sorted(doc["paths"]["/v1/usage"]["get"]["responses"]) == ["200", "400", "401", "403"]
    assert sorted(doc["paths"]["/health"]["get"]["responses"]) == ["200", "503"]
    for path, op in OPERATIONS.items():
        (operation,) = doc["paths"][path].values()
        for exc in op.errors:
            content = operation["responses"][str(exc.status)]["content"]
            assert content == {"application/json": {"schema": error}}, (path, exc)
    assert doc["components"]["schemas"]["ErrorDetail"]["required"] == [
        "message",
        "type",
        "param",
        "code",
    ]


def test_generation_routes_document_json_and_sse_replies():
    """`"stream": true` answers text/event-stream: documented next to the JSON reply."""
    doc = _api().openapi()
    for path in BODIES:
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert sorted(content) == ["application/json", "text/event-stream"]


def test_error_bodies_validate_against_the_document(spec):
    """What errors.py and the 404/405 handlers send is what the document says."""
    op = spec["/v1/chat/completions"]["POST"]
    errors = [
        model_not_found("x"),
        AuthenticationError("no key", code="missing_api_key"),
        OverloadedError("busy", code="overloaded"),
        KVLoadFailed("gone"),
        to_api_error(KeyError("internal")),
    ]
    try:
        ChatCompletionRequest.model_validate({"model": MODEL, "messages": []})
    except ValidationError as exc:
        errors.append(to_api_error(exc))
    for err in errors:
        ErrorResponse.model_validate(err.body())
        if err.status < 500 or err.status == 503:
            op.validate_response(_response(err.status, "/v1/chat/completions", json=err.body()))
    assert not op.is_valid_response(_response(400, "/v1/chat/completions", json={"detail": 1}))


def test_unknown_method_is_405_with_allow_and_the_openai_error_body():
    """A wrong method names the allowed ones (RFC 9110 `Allow`), in the OpenAI shape."""
    client = TestClient(_api())
    reply = client.delete("/v1/models")
    assert reply.status_code == 405
    assert reply.headers["allow"] == "GET"
    assert ErrorResponse.model_validate(reply.json()).error.type == "invalid_request_error"
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    ErrorResponse.model_validate(missing.json())


@pytest.mark.parametrize("path", sorted(BODIES))
def test_bodies_the_document_accepts_the_server_accepts(spec, path):
    """Every body generated from the document passes the server's rules: what the schema
    accepts the server accepts (an empty `prompt`, five `stop`s, `stream_options` without
    `stream` are ruled out by the schema, as by the server)."""

    @given(spec[path]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE))
    @EXAMPLES
    def check(case: Any) -> None:
        assert _server_accepts(path, case.body), case.body

    check()


@pytest.mark.parametrize("path", sorted(BODIES))
def test_bodies_the_document_rejects_the_server_rejects(spec, path):
    """Every body the document rules out is refused by the server too (a 4xx)."""

    @given(spec[path]["POST"].as_strategy(generation_mode=GenerationMode.NEGATIVE))
    @EXAMPLES
    def check(case: Any) -> None:
        assert not _server_accepts(path, case.body), case.body

    check()


def test_the_document_states_the_server_rules_it_checks():
    """Spot checks of the rules the schema states, each one the server enforces."""
    doc = _api().openapi()["components"]["schemas"]
    prompt = {b["type"]: b for b in doc["CompletionRequest"]["properties"]["prompt"]["anyOf"]}
    assert prompt["string"]["minLength"] == 1
    assert prompt["array"]["minItems"] == 1
    assert prompt["array"]["items"] == {"type": "integer", "minimum": 0, "maximum": VOCAB_SIZE - 1}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert doc[name]["properties"]["model"]["enum"] == [MODEL]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": MODEL, "prompt": ""})


def test_stream_events_validate_against_the_document(spec):
    """Each SSE event is a JSON chunk (None fields left out, `finish_reason` too until the
    last one), an in-band error, or the final [DONE]."""
    chat = ChatCompletionChunk(
        id="c",
        created=1,
        model=MODEL,
        choices=[ChunkChoice(index=0, delta=DeltaMessage(role="assistant", content="hi"))],
    )
    text = CompletionResponse(model=MODEL, choices=[CompletionChoice(index=0, text="hi")])
    headers = {"content-type": "text/event-stream"}
    for path, chunk in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        op = spec[path]["POST"]
        stream = sse_frame(chunk) + sse_frame(OverloadedError("gone").body()) + DONE_FRAME
        op.validate_response(_response(200, path, content=stream, headers=headers))
        bad = sse_frame({"choices": "none"}) + DONE_FRAME
        assert not op.is_valid_response(_response(200, path, content=bad, headers=headers))
