"""The one error vocabulary of every server here (API, controller, worker): `ErrorCode` and `APIError`.

    raise APIError(ErrorCode.INVALID_VALUE, "'top_p' must be in (0, 1], got 2", "top_p")

Every error any of our servers returns has OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_type"}}
"""
from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """Error codes (OpenAI's where one exists) with their HTTP status and OpenAI error type."""

    INVALID_JSON = "invalid_json"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    MISSING_PARAMETER = "missing_required_parameter"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    INVALID_MESSAGES = "invalid_messages"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTERED = "content_filter"
    INVALID_API_KEY = "invalid_api_key"
    INVALID_WORKER_SECRET = "invalid_worker_secret"
    BODY_TOO_LARGE = "request_too_large"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker_available"
    WORKER_FAILED = "worker_failed"
    CLIENT_CLOSED = "client_closed_request"
    INTERNAL = "internal_error"

    @property
    def status(self) -> int:
        return _STATUS.get(self, 400)

    @property
    def kind(self) -> str:
        """OpenAI's error `type`."""
        return _KIND.get(self, "invalid_request_error")

    @property
    def retry_after(self) -> int | None:
        """Seconds a client should wait before retrying (the `Retry-After` header), for the errors that pass."""
        return RETRY_AFTER_S if self in (ErrorCode.QUEUE_FULL, ErrorCode.NO_WORKER) else None


RETRY_AFTER_S = 1
_STATUS = {ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405,
           ErrorCode.INVALID_API_KEY: 401, ErrorCode.INVALID_WORKER_SECRET: 403, ErrorCode.BODY_TOO_LARGE: 413,
           ErrorCode.QUEUE_FULL: 429, ErrorCode.NO_WORKER: 503, ErrorCode.WORKER_FAILED: 502,
           ErrorCode.CLIENT_CLOSED: 499, ErrorCode.INTERNAL: 500}
_KIND = {ErrorCode.INVALID_API_KEY: "authentication_error", ErrorCode.INVALID_WORKER_SECRET: "permission_error",
         ErrorCode.QUEUE_FULL: "rate_limit_error", ErrorCode.NO_WORKER: "server_error",
         ErrorCode.WORKER_FAILED: "server_error", ErrorCode.INTERNAL: "server_error",
         ErrorCode.NOT_FOUND: "not_found_error"}


class APIError(Exception):
    """An error to return to the client in OpenAI's shape."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = ErrorCode(code), message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code.kind, "param": self.param,
                          "code": self.code.value}}

    def headers(self) -> dict:
        """HTTP headers that go with the error: `Retry-After` on 429 and 503, which clients retry."""
        wait = self.code.retry_after
        return {} if wait is None else {"Retry-After": str(wait)}

    @classmethod
    def from_body(cls, body: Any, status: int) -> "APIError":
        """Rebuild an error another of our servers returned (unknown shapes become WORKER_FAILED)."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            try:
                return cls(ErrorCode(err.get("code")), str(err.get("message")), err.get("param"))
            except ValueError:
                pass
        return cls(ErrorCode.WORKER_FAILED, f"an upstream server answered HTTP {status}")
