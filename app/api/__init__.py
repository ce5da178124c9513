"""OpenAI-compatible wire format: schemas (requests, responses, usage), errors, SSE frames.

Pure pydantic, no Ray and no HTTP framework, so the ingress and the typed Python handle
share one definition and unit tests need nothing running.
"""
