"""Stored responses of the Responses API: bounded, least recently used dropped first, and
tenant-scoped (another tenant's id is "not found")."""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from app.api.errors import NotFoundError
from app.api.messages import ChatMessage
from app.api.responses import Response


@dataclass(slots=True)
class StoredResponse:
    tenant: str
    messages: list[ChatMessage]  # the conversation through this response's output
    token_ids: array[int]  # prompt + output, exactly as the engines saw them (int32)
    response: Response


class ResponseStore:
    """Responses by id, least recently used dropped past `capacity` responses or
    `max_tokens` stored tokens (a conversation's text is about as large as its tokens, so
    the token budget bounds memory); a tenant sees only its own (another tenant's id is
    "not found")."""

    def __init__(self, capacity: int = 4096, max_tokens: int = 16_000_000):
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(
        self,
        response_id: str,
        tenant: str,
        messages: list[ChatMessage],
        token_ids: list[int],
        response: Response,
    ) -> None:
        item = StoredResponse(tenant, messages, array("i", token_ids), response)
        with self._lock:
            old = self._items.pop(response_id, None)
            self.num_tokens -= len(old.token_ids) if old else 0
            self._items[response_id] = item
            self.num_tokens += len(item.token_ids)
            while len(self._items) > self.capacity or (
                self.num_tokens > self.max_tokens and len(self._items) > 1
            ):
                _, dropped = self._items.popitem(last=False)
                self.num_tokens -= len(dropped.token_ids)

    def get(self, response_id: str, tenant: str) -> StoredResponse:
        """Raises NotFoundError (404): unknown, evicted, or another tenant's."""
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
        if item is None or item.tenant != tenant:
            raise NotFoundError(
                f"no response {response_id!r}",
                param="previous_response_id",
                code="response_not_found",
            )
        return item

    def __len__(self) -> int:
        return len(self._items)
