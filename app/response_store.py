"""Stored responses of the Responses API: bounded, least recently used dropped first, and
tenant-scoped (another tenant's id is "not found")."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from app.api.errors import NotFoundError
from app.api.messages import ChatMessage
from app.api.responses import Response


@dataclass(slots=True)
class StoredResponse:
    tenant: str
    messages: list[ChatMessage]  # the conversation through this response's output
    token_ids: list[int]  # prompt + output, exactly as the engines saw them
    response: Response


class ResponseStore:
    """Responses by id, least recently used dropped past `capacity`; a tenant sees only
    its own (another tenant's id is "not found")."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, item: StoredResponse) -> None:
        with self._lock:
            self._items[response_id] = item
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

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
