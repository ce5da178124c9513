"""OpenAI-compatible wire format and the HTTP edge.

schemas.py — requests, responses, usage (pure pydantic: the ingress and the typed handle
             share one definition)
errors.py  — exception → {"error": {...}} + status code (the only place with codes)
http.py    — the FastAPI side: the body (413/400), error responses, the OpenAPI document
             with request bodies and every error status, error handlers for unknown routes
sse.py     — server-sent-event frames for streaming
"""
