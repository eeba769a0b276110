"""OpenAI-format errors of the server.

Every failure the server reports is an :class:`APIError`: an HTTP status, a message that says what went wrong
and what to do, and the OpenAI error fields (``type``, ``code``, ``param``), rendered as
``{"error": {"message", "type", "param", "code"}}`` — the shape the official ``openai`` client parses into its
``APIStatusError`` subclasses (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def not_found(message: str, param: str | None = None, code: str = "model_not_found") -> APIError:
    return APIError(404, message, "invalid_request_error", code, param)


def busy(status: int, message: str, retry_after: int) -> APIError:
    """429 (queue full) or 503 (waited too long for a slot), with Retry-After in seconds."""
    kind = "rate_limit_exceeded" if status == 429 else "server_overloaded"
    return APIError(status, message, "server_error" if status == 503 else "requests", kind,
                    headers={"Retry-After": str(int(retry_after))})


def server_error(message: str, code: str = "internal_error") -> APIError:
    return APIError(500, message, "server_error", code)
