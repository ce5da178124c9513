"""The HTTP edge and the public Python API.

Package map (reading path):
  1. api/schemas.py — OpenAI-compatible requests/responses, usage with cache-hit/miss tokens,
                      mapping onto engine SamplingParams
  2. api/errors.py  — exceptions -> {"error": {...}} + HTTP status (the only place with codes)
  3. api/sse.py     — server-sent-event frames for streaming

The Ray Serve ingress (FastAPI via @serve.ingress), the builder and the typed handle client
land with the Serve application issue.
"""
