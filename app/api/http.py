"""HTTP edges of the API: the request body, error responses, the SSE stream, and the OpenAPI
document (the routes read raw JSON themselves, for 413/400 control, so the document's
bodies and responses are written here)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ErrorResponse,
    KVLoadFailed,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    to_api_error,
)
from app.api.replies import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    HealthStatus,
    ModelList,
    UsagePage,
)
from app.api.responses import Response, ResponseEvent, ResponsesRequest
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.api.sse import DONE_FRAME, sse_frame

logger = logging.getLogger("app.ingress")


async def read_json(http: Request, limit: int) -> Any:
    """The body as a JSON object: 413 over `limit` bytes (declared or sent), 400 otherwise."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    body = await http.body()
    if len(body) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    return data


def install_error_handlers(api: FastAPI) -> None:
    """Unknown routes and methods answer in the OpenAI error shape too."""

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    error = to_api_error(exc)
    if error.status >= 500 and error.code not in ("overloaded", "queue_full"):
        logger.error("request failed", exc_info=exc)
    return JSONResponse(
        error.body(), status_code=error.status, headers=(headers or {}) | error.headers
    )


async def sse(
    first: BaseModel, rest: AsyncIterator[BaseModel], done: Callable[[], None]
) -> AsyncIterator[bytes]:
    """The stream as SSE frames; `done()` runs when it ends, however it ends."""
    try:
        async with contextlib.aclosing(rest):  # type: ignore[type-var]
            yield sse_frame(first)
            try:
                async for chunk in rest:
                    yield sse_frame(chunk)
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                yield sse_frame(to_api_error(exc).body())
        yield DONE_FRAME
    finally:
        done()


BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}


@dataclass(frozen=True)
class Operation:
    """What one route answers, for /openapi.json: the routes take the raw `Request` (for
    413/400 control), so FastAPI sees neither their bodies nor their responses."""

    ok: type[BaseModel]  # the 200 body
    errors: tuple[type[APIError], ...] = ()  # the errors the route raises, OpenAI-shaped
    chunk: type[BaseModel] | None = None  # with `"stream": true`, SSE events of these
    unready: bool = False  # 503 with the `ok` body until the engines report (/health)


_GENERATE_ERRORS = (
    BadRequestError,
    AuthenticationError,
    PermissionDeniedError,
    NotFoundError,
    RequestTimeoutError,
    PayloadTooLargeError,
    RateLimitError,
    OverloadedError,
    KVLoadFailed,
)
OPERATIONS: dict[str, Operation] = {
    "/health": Operation(HealthStatus, unready=True),
    "/v1/models": Operation(ModelList, (AuthenticationError,)),
    "/v1/chat/completions": Operation(
        ChatCompletionResponse, _GENERATE_ERRORS, chunk=ChatCompletionChunk
    ),
    "/v1/completions": Operation(CompletionResponse, _GENERATE_ERRORS, chunk=CompletionResponse),
    "/v1/responses": Operation(Response, _GENERATE_ERRORS, chunk=ResponseEvent),
    "/v1/responses/{response_id}": Operation(Response, (AuthenticationError, NotFoundError)),
    "/v1/usage": Operation(
        UsagePage, (BadRequestError, AuthenticationError, PermissionDeniedError)
    ),
}
_REF = "#/components/schemas/{model}"
_SSE = (
    'The response; with `"stream": true`, an SSE stream of `data: {chunk}` events ending '
    "`data: [DONE]` (an error after the first chunk comes as a last `data: {error}` event)."
)


def _sse_event(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """The schema of one SSE event (app/api/sse.py): its `data` is a JSON chunk or error,
    or the final `[DONE]`."""
    payload = {"anyOf": [chunk, error]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


def openapi_with_bodies(
    api: FastAPI,
    model_names: list[str],
    max_tokens_limit: int | None = None,
    vocab_size: int | None = None,
) -> Callable[[], dict[str, Any]]:
    """A builder of `api`'s OpenAPI document that documents what the routes really accept
    and answer, so clients and fuzzers see the real contract: each POST route's JSON body
    (its pydantic model with the server's limits, `_limit_body`), each route's 200 body and
    content types, and every error status it answers, with the OpenAI error schema. It
    caches nothing on `api` (the caller keeps the document)."""

    def openapi() -> dict[str, Any]:
        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        inputs = [(model, "validation") for model in BODIES.values()]
        replies = {m for op in OPERATIONS.values() for m in (op.ok, op.chunk) if m is not None}
        outputs = [(model, "serialization") for model in sorted(replies, key=str)]
        refs, defs = models_json_schema(
            [*inputs, *outputs, (ErrorResponse, "serialization")], ref_template=_REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs["$defs"])
        for path, model in BODIES.items():
            ref = refs[(model, "validation")]
            body = components[ref["$ref"].rsplit("/", 1)[1]]
            _limit_body(body, model_names, max_tokens_limit, vocab_size)
            if path in schema["paths"]:
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref}},
                }
        out = {model: ref for (model, mode), ref in refs.items() if mode == "serialization"}
        for path, op in OPERATIONS.items():
            for operation in schema["paths"].get(path, {}).values():
                operation["responses"] = _responses(op, out)
        return schema

    return openapi


def _limit_body(
    body: dict[str, Any],
    model_names: list[str],
    max_tokens_limit: int | None,
    vocab_size: int | None,
) -> None:
    """The server's own limits in a request body's schema: `model` is a served name,
    `max_tokens` at most the limit, prompt token ids in the vocabulary."""
    properties = body["properties"]
    properties["model"]["enum"] = model_names
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        for branch in properties.get(name, {}).get("anyOf", []):
            if max_tokens_limit is not None and branch.get("type") == "integer":
                branch["maximum"] = max_tokens_limit
    for branch in properties.get("prompt", {}).get("anyOf", []):
        if vocab_size is not None and branch.get("type") == "array":
            branch["items"]["maximum"] = vocab_size - 1


def _responses(op: Operation, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    """One operation's `responses`: 200 (JSON, or SSE), then each error status with the
    OpenAI error body, described by the errors that answer it."""
    error = refs[ErrorResponse]
    content: dict[str, Any] = {"application/json": {"schema": refs[op.ok]}}
    if op.chunk is not None:
        content["text/event-stream"] = {"schema": _sse_event(refs[op.chunk], error)}
    description = "The response." if op.chunk is None else _SSE
    responses: dict[str, Any] = {"200": {"description": description, "content": content}}
    if op.unready:
        responses["503"] = {
            "description": "Starting: engines are not all up yet",
            "content": {"application/json": {"schema": refs[op.ok]}},
        }
    by_status: dict[int, list[str]] = {}
    for exc in op.errors:
        by_status.setdefault(exc.status, []).append(" ".join((exc.__doc__ or "").split()))
    for status, docs in sorted(by_status.items()):
        responses[str(status)] = {
            "description": " ".join(docs),
            "content": {"application/json": {"schema": error}},
        }
    return responses
