"""Service errors with one code each, mapped to HTTP statuses and gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from ray.exceptions import RayActorError

T = TypeVar("T")


S = grpc.StatusCode
CLIENT = "invalid_request_error"  # OpenAI's error type for the client's mistakes


class ServiceError(Exception):
    """An error a client is told about: a stable code and a message naming the problem.

    Each kind is a subclass that states its code, HTTP status, gRPC status and OpenAI error
    type in its class line: `class NotFound(ServiceError, code="not_found", http=404, ...)`.
    """

    code = "internal_error"
    http_status = 500
    grpc_status = S.INTERNAL
    error_type = "server_error"

    def __init_subclass__(
        cls,
        code: str | None = None,
        http: int | None = None,
        grpc_status: grpc.StatusCode | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init_subclass__()
        for name, value in (("code", code), ("http_status", http), ("grpc_status", grpc_status),
                            ("error_type", error_type)):  # fmt: skip
            if value is not None:
                setattr(cls, name, value)

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


class InvalidArgument(
    ServiceError, code="invalid_value", http=400, grpc_status=S.INVALID_ARGUMENT, error_type=CLIENT
):
    """A request field or message the service cannot take; the message names it."""


class NotFound(
    ServiceError, code="not_found", http=404, grpc_status=S.NOT_FOUND, error_type=CLIENT
):
    """No such video, session or model (or not one the caller may see)."""


class Unauthenticated(
    ServiceError,
    code="invalid_api_key",
    http=401,
    grpc_status=S.UNAUTHENTICATED,
    error_type=CLIENT,
):
    """No API key, or one no tenant holds (checked before any work)."""


class TooLarge(
    ServiceError,
    code="request_too_large",
    http=413,
    grpc_status=S.INVALID_ARGUMENT,
    error_type=CLIENT,
):
    """A request body or message over the size the service accepts."""


class Internal(ServiceError):
    """An unexpected failure: the client gets an error id, the details go to the server log."""

    @classmethod
    def logged(cls, log: logging.Logger, err: BaseException, during: str) -> Internal:
        error_id = f"err_{uuid.uuid4().hex[:16]}"
        log.error("%s failed (%s)", during, error_id, exc_info=err)
        return cls(f"internal error while {during}; quote {error_id} when reporting it")


class QueueFull(
    ServiceError,
    code="queue_full",
    http=429,
    grpc_status=S.RESOURCE_EXHAUSTED,
    error_type="rate_limit_error",
):
    """Every place to wait is taken: try again after `retry_after_s`."""

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 5) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.retry_after_s))


class QuotaExceeded(
    ServiceError,
    code="quota_exceeded",
    http=429,
    grpc_status=S.RESOURCE_EXHAUSTED,
    error_type="rate_limit_error",
):
    """The caller's tenant is at one of its quotas; the message names it, its limit and the
    use; `retry_after_s` when waiting helps (None: the request itself is over the limit)."""

    def __init__(
        self, message: str, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.retry_after_s))


class QueueTimeout(ServiceError, code="queue_timeout", http=503, grpc_status=S.DEADLINE_EXCEEDED):
    """Work waited past its deadline for a place to run."""


class Unavailable(ServiceError, code="service_unavailable", http=503, grpc_status=S.UNAVAILABLE):
    """Something the service depends on (storage, a stage) does not answer."""


class AtCapacity(ServiceError, code="at_capacity", http=503, grpc_status=S.RESOURCE_EXHAUSTED):
    """A replica holds as many sessions as its memory budget allows."""


class SessionNotHeld(
    ServiceError, code="session_not_held", http=409, grpc_status=S.FAILED_PRECONDITION
):
    """A stage was asked about a session whose caches it does not hold."""


async def remote_result(response: Awaitable[T], timeout_s: float | None = None) -> T:
    """Await a stage call (a Serve deployment response), re-raising the service error it
    carried as itself rather than inside Ray's wrappers; a replica that died under the call is
    `ReplicaLost` (whatever it held must be rebuilt elsewhere), and so is a call unanswered for
    `timeout_s` (a call sent to a replica as it died can wait forever; it is cancelled)."""
    scope = None
    try:
        if timeout_s is None:
            return await response
        async with asyncio.timeout(timeout_s) as scope:
            return await response
    except TimeoutError:
        if scope is not None and scope.expired():
            raise ReplicaLost(
                f"no answer from the replica within {timeout_s:g} s (stage_call_timeout_s)"
            ) from None
        raise
    except Exception as err:
        cause = unwrap(err)
        if cause is not err and isinstance(cause, ServiceError):
            raise cause from None
        if isinstance(cause, RayActorError):
            raise ReplicaLost(
                f"the replica serving the call is gone ({type(cause).__name__})"
            ) from err
        raise


class ReplicaLost(SessionNotHeld, code="replica_lost"):
    """The replica holding a session died (killed, evicted, crashed) during a call."""


def unwrap(err: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while seen < 8 and not isinstance(err, ServiceError):
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or inner is err:
            break
        err, seen = inner, seen + 1
    return err
