"""Errors the engine raises for bad requests (mapped to HTTP 400 by the ingress)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given.

    Attributes:
        param: the offending request field (OpenAI `param`), when one is to blame.
        code: a short machine-readable reason, e.g. "context_length_exceeded".
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
