"""Service errors across a gRPC link between stages, both ways.

A stage served over gRPC answers a `ServiceError` with its gRPC status (NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION for a session it does not hold, INVALID_ARGUMENT, ...),
its message as the details, and its code and param in the trailing metadata; the caller's side
raises the same error class again, so the session driver's restore-and-retry works as it does
over Ray's handles. A link that does not answer (the server gone, a deadline passed) is
`ReplicaLost`: whatever the server held must be rebuilt.
"""

from __future__ import annotations

import grpc

from services.errors import Internal, ReplicaLost, ServiceError

CODE_KEY, PARAM_KEY = "histream-error-code", "histream-error-param"
LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _classes(root: type[ServiceError]) -> dict[str, type[ServiceError]]:
    found = {root.code: root}
    for sub in root.__subclasses__():
        for code, cls in _classes(sub).items():
            found.setdefault(code, cls)
    return found


def error_classes() -> dict[str, type[ServiceError]]:
    """Every service error class by its code (the most general class of a shared code)."""
    return _classes(ServiceError)


def trailers(err: ServiceError) -> tuple[tuple[str, str], ...]:
    return ((CODE_KEY, err.code), (PARAM_KEY, err.param or ""))


def from_rpc_error(err: grpc.RpcError, what: str) -> ServiceError:
    """The service error a failed call carried (or ReplicaLost for a link that failed)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    metadata = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    cls = error_classes().get(metadata.get(CODE_KEY, ""))
    if cls is not None:  # the server's own error (its error id kept, for an internal one)
        cls = Internal if cls is ServiceError else cls
        return cls(details, metadata.get(PARAM_KEY) or None)
    if code in LOST:
        return ReplicaLost(f"{what}: no answer over gRPC ({code.name}: {details})")
    return Internal(f"{what} failed over gRPC ({code.name}: {details})")
