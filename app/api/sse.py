"""Server-sent events framing for streamed completions."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: BaseModel | dict[str, Any]) -> bytes:
    """One `data: <json>` event. Models are dumped without None fields, like OpenAI."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", exclude_none=True)
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    if "sequence_number" in payload and isinstance(payload.get("type"), str):
        return f"event: {payload['type']}\n".encode() + data  # a Responses API event
    return data
