"""Errors a client sees: an HTTP status and OpenAI's body, {"error": {message, type, param, code}}."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request that ends with an error response (or an error event, once a stream has begun)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int = 5) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="service_unavailable",
                    headers={"Retry-After": str(retry_after)})


def internal_error(error: BaseException) -> ApiError:
    """A bug of ours, named for the log reader (the client sees a 500)."""
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error",
                    code="internal_error")
