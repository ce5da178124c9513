"""HTTP edges of the API: the request body, error responses, the SSE stream, and the OpenAPI
document's request bodies (the routes read raw JSON themselves, for 413/400 control)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import BadRequestError, PayloadTooLargeError, to_api_error
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
}


def openapi_with_bodies(
    api: FastAPI, model_names: list[str], max_tokens_limit: int | None = None
) -> Callable[[], dict[str, Any]]:
    """`api.openapi` that also documents each POST route's JSON body (its pydantic model,
    `model` limited to the served names, `max_tokens` to the server's limit), so clients
    and fuzzers see the real contract."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            body["properties"]["model"]["enum"] = model_names
            for name in ("max_tokens", "max_completion_tokens"):
                for branch in body["properties"].get(name, {}).get("anyOf", []):
                    if max_tokens_limit is not None and branch.get("type") == "integer":
                        branch["maximum"] = max_tokens_limit
            components[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        api.openapi_schema = schema
        return schema

    return openapi
