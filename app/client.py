"""DualPathClient: the typed Python API for other Ray jobs (no HTTP).

    import ray
    from app.client import DualPathClient
    from app.api.schemas import ChatCompletionRequest

    ray.init(address="auto")
    client = DualPathClient(api_key="sk-...")        # serve.get_app_handle("dualpath")
    reply = client.chat_sync(ChatCompletionRequest(model="SmolLM2-135M-Instruct",
                                                   messages=[{"role": "user", "content": "Hi"}]))

Async code uses `await client.chat(...)` and `async for chunk in client.chat_stream(...)`.
Errors arrive as the same exceptions the HTTP API maps to status codes (app.api.errors).
The key is the tenant's API key when the app has keys configured (admission, limits and
billing are the same as over HTTP); an open app needs none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.replies import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
)
from app.api.schemas import ChatCompletionRequest, CompletionRequest


class DualPathClient:
    def __init__(
        self,
        app_name: str = "dualpath",
        handle: DeploymentHandle | None = None,
        api_key: str | None = None,
    ):
        self.handle = handle or serve.get_app_handle(app_name)
        self.api_key = api_key

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        return await self.handle.chat.remote(request, api_key=self.api_key)

    async def chat_stream(
        self, request: ChatCompletionRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self.handle.options(stream=True).chat_stream.remote(
            request, api_key=self.api_key
        ):
            yield chunk

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        return await self.handle.complete.remote(request, api_key=self.api_key)

    async def complete_stream(
        self, request: CompletionRequest
    ) -> AsyncIterator[CompletionResponse]:
        async for chunk in self.handle.options(stream=True).complete_stream.remote(
            request, api_key=self.api_key
        ):
            yield chunk

    async def models(self) -> ModelList:
        return await self.handle.models.remote(api_key=self.api_key)

    # ------------------------------------------------------------------ blocking helpers
    def chat_sync(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        return self.handle.chat.remote(request, api_key=self.api_key).result()

    def chat_stream_sync(self, request: ChatCompletionRequest) -> list[ChatCompletionChunk]:
        return list(
            self.handle.options(stream=True).chat_stream.remote(request, api_key=self.api_key)
        )

    def complete_sync(self, request: CompletionRequest) -> CompletionResponse:
        return self.handle.complete.remote(request, api_key=self.api_key).result()
