"""Ingress: the Serve deployment at the edge, a shell over `app.frontend.Frontend`.

HTTP routes (OpenAI-compatible) and the typed handle API (`chat`, `chat_stream`,
`complete`, `complete_stream`, `models`; see app.client) are one line each. The OpenAPI
document is served by a route too (`/openapi.json`, built per replica from its config), so
nothing module-level changes per replica.
"""

# NOTE: no `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the class-based routes, or it treats `http` as a query parameter.

import inspect
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.http import install_error_handlers
from app.api.replies import ModelList
from app.api.responses import GenerateRequest, ResponsesRequest
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.config import AppConfig
from app.frontend import Frontend
from app.serve_cluster import NodeHandles, ServeCluster
from deployments.metrics import Metrics

# NOTE: newer FastAPI opens its own HTTP span per request; ours (app/root_spans.py, which
# handle calls get too) is the root, so FastAPI's telemetry is off where it exists.
_quiet = {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
_options = _quiet if "telemetry" in inspect.signature(FastAPI).parameters else {}
api = FastAPI(title="dualpath-serve", openapi_url=None, docs_url=None, redoc_url=None, **_options)
install_error_handlers(api)
hidden = {"include_in_schema": False}


@serve.ingress(api)
class Ingress:
    def __init__(
        self, config: AppConfig, scheduler: DeploymentHandle, nodes: dict[str, NodeHandles]
    ):
        # a TrafficManager answers within its read timeout; one that never answers is gone
        read_timeout_s = config.kvstore.read_timeout_s
        load_timeout_s = None if read_timeout_s is None else read_timeout_s + 10.0
        cluster = ServeCluster(scheduler, nodes, load_timeout_s)
        self.frontend = Frontend(config, cluster, cluster, Metrics("ray"))

    # ------------------------------------------------------------------ Python handle API
    # NOTE: handle callers present the same API key as HTTP callers (`api_key=`), and get
    # the same admission, limits and billing. See app.client for the typed wrapper.
    async def chat(self, request: GenerateRequest, api_key: str | None = None) -> Any:
        """A chat.completion (a text_completion for a CompletionRequest, a response for a
        ResponsesRequest)."""
        return await self.frontend.call(api_key, request)

    async def chat_stream(
        self, request: GenerateRequest, api_key: str | None = None
    ) -> AsyncIterator[Any]:
        """Its chunks, as the HTTP stream's `data:` frames carry them."""
        async for chunk in self.frontend.stream(api_key, request):
            yield chunk

    # one path: the request's type decides
    complete, complete_stream = responses, responses_stream = chat, chat_stream

    async def models(self, api_key: str | None = None) -> ModelList:
        return await self.frontend.models(api_key)

    async def admission_stats(self) -> dict[str, Any]:
        return self.frontend.admission_stats()

    # ------------------------------------------------------------------ HTTP
    @api.get("/health")
    async def health(self) -> Response:
        return await self.frontend.health()

    @api.get("/v1/models")
    async def list_models(self, http: Request) -> Response:
        return await self.frontend.http_models(http)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, http: Request) -> Response:
        return await self.frontend.generate(http, ChatCompletionRequest)

    @api.post("/v1/completions")
    async def completions(self, http: Request) -> Response:
        return await self.frontend.generate(http, CompletionRequest)

    @api.post("/v1/responses")
    async def create_response(self, http: Request) -> Response:
        return await self.frontend.generate(http, ResponsesRequest)

    @api.get("/v1/responses/{response_id}")
    async def get_response(self, http: Request, response_id: str) -> Response:
        return await self.frontend.http_response(http, response_id)

    @api.get("/v1/usage")
    async def usage(self, http: Request) -> Response:
        """The caller's usage and cost in time buckets (OpenAI usage-API shape)."""
        return await self.frontend.http_usage(http)

    @api.get("/openapi.json", **hidden)
    async def openapi(self) -> Response:
        return self.frontend.openapi(api)

    @api.get("/docs", **hidden)
    async def docs(self) -> Response:
        return self.frontend.docs()
