"""OpenAI-compatible wire format and the HTTP edge.

schemas.py   — chat and completion requests (pure pydantic: the ingress and the typed
               handle share one definition)
messages.py  — chat messages, function tools, tool choice, response formats
replies.py   — responses, chunks, usage, models, health
responses.py — the Responses API: request, response object, streamed events
errors.py    — exception → {"error": {...}} + status code (the only place with codes)
http.py      — the FastAPI side: the body (413/400), error responses, the OpenAPI document
               with request bodies and every error status, error handlers for unknown routes
sse.py       — server-sent-event frames for streaming
"""
