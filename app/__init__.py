"""The HTTP edge and the public Python API (OpenAI-compatible ingress) — lands with the Serve
application issue. Empty until then."""
