"""Service errors with one code each, mapped to HTTP statuses and gRPC status codes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import grpc

T = TypeVar("T")


class ServiceError(Exception):
    """An error a client is told about: a stable code and a message naming the problem."""

    code = "internal_error"
    http_status = 500
    grpc_status = grpc.StatusCode.INTERNAL
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        """The OpenAI-style error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self):  # survive pickling across Ray processes with the message intact
        return (type(self), (self.message, self.param))


class InvalidArgument(ServiceError):
    code = "invalid_value"
    http_status = 400
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404
    grpc_status = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"


class TooLarge(ServiceError):
    """A request body or message over the size the service accepts."""

    code = "request_too_large"
    http_status = 413
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class Internal(ServiceError):
    """An unexpected failure: the client gets an error id, the details go to the server log."""

    @classmethod
    def logged(cls, log: logging.Logger, err: BaseException, during: str) -> Internal:
        error_id = f"err_{uuid.uuid4().hex[:16]}"
        log.error("%s failed (%s)", during, error_id, exc_info=err)
        return cls(f"internal error while {during}; quote {error_id} when reporting it")


class QueueFull(ServiceError):
    """Every place to wait is taken: try again after `retry_after_s`."""

    code = "queue_full"
    http_status = 429
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 5) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.retry_after_s))


class QueueTimeout(ServiceError):
    """Work waited past its deadline for a place to run."""

    code = "queue_timeout"
    http_status = 503
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    """Something the service depends on (storage, a stage) does not answer."""

    code = "service_unavailable"
    http_status = 503
    grpc_status = grpc.StatusCode.UNAVAILABLE


class AtCapacity(ServiceError):
    """A replica holds as many sessions as its memory budget allows."""

    code = "at_capacity"
    http_status = 503
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class SessionNotHeld(ServiceError):
    """A stage was asked about a session whose caches it does not hold."""

    code = "session_not_held"
    http_status = 409
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


async def remote_result(response: Awaitable[T]) -> T:
    """Await a stage call (a Serve deployment response), re-raising the service error it
    carried as itself rather than inside Ray's wrappers."""
    try:
        return await response
    except Exception as err:
        cause = unwrap(err)
        if cause is not err and isinstance(cause, ServiceError):
            raise cause from None
        raise


def unwrap(err: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while seen < 8 and not isinstance(err, ServiceError):
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or inner is err:
            break
        err, seen = inner, seen + 1
    return err
