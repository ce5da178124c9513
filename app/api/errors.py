"""Exceptions -> OpenAI error bodies `{"error": {"message", "type", "param", "code"}}` + status.

The only place that knows HTTP status codes. Bad input is always a 4xx naming the field;
anything unexpected is a 500 whose message does not leak internals.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from deployments.scheduler.policy import NoEngineAvailable
from engine.errors import InvalidRequestError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error status, as OpenAI sends it (its schema in /openapi.json)."""

    error: ErrorDetail


class APIError(Exception):
    """What the client sees of a failure; raised as itself, an unexpected one: a 500 whose
    message does not leak internals."""

    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequestError(APIError):
    """The body is malformed or a value is out of range; `param` names the field."""

    status, type = 400, "invalid_request_error"


class AuthenticationError(APIError):
    """The API key is missing or unknown."""

    status, type = 401, "authentication_error"


class NotFoundError(APIError):
    """The named model (or route) does not exist."""

    status, type = 404, "invalid_request_error"


class PermissionDeniedError(APIError):
    """The key may not do this (a service tier it lacks, another tenant's usage)."""

    status, type = 403, "permission_error"


class RequestTimeoutError(APIError):
    """The request waited too long in the admission queue."""

    status, type = 408, "timeout_error"


class PayloadTooLargeError(APIError):
    """The request body is over the server's size limit."""

    status, type = 413, "invalid_request_error"


class RateLimitError(APIError):
    """Over the key's rate or concurrency limit, or past a flex request's deadline; retry
    after `Retry-After`."""

    status, type = 429, "rate_limit_error"


class OverloadedError(APIError):
    """No capacity now (a full queue, no engine); retry after `Retry-After`."""

    status, type = 503, "overloaded_error"


class KVLoadFailed(APIError):
    """Stored KV the plan counted on could not be read, under `kvstore.load_failure: fail`."""

    status, type = 503, "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="kv_load_failed", headers={"Retry-After": "1"})


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(
        f"The model `{model}` does not exist", param="model", code="model_not_found"
    )


def root_cause(exc: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error (raised in another replica)."""
    while isinstance(cause := getattr(exc, "cause", None), BaseException) and cause is not exc:
        exc = cause
    return exc


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception raised while serving a request to the error the client sees."""
    exc = root_cause(exc)
    if isinstance(exc, NoEngineAvailable):
        return OverloadedError(
            f"no capacity to serve the request now: {exc}",
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return BadRequestError(message + extra, param=param, code="invalid_value")
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc), param=exc.param, code=exc.code)
    return APIError("internal error while serving the request", code="internal_error")
