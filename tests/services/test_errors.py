"""Every service error's code on each transport: the HTTP status and OpenAI error body, and the
gRPC status, details and `retry-after` trailer through a real gRPC server and client; an
unexpected failure is INTERNAL with an error id and nothing of its message. Backs README's
*Limits* table (429 `queue_full` + `Retry-After`, gRPC `RESOURCE_EXHAUSTED` + trailer
`retry-after`) and *Tenants* (429 `quota_exceeded`), and the stage errors (`at_capacity`,
`session_not_held`, `replica_lost`) as a gateway passes them on."""

from __future__ import annotations

import json
import pickle
from concurrent import futures

import grpc
import pytest

from services.errors import (
    AtCapacity,
    InvalidArgument,
    NotFound,
    QueueFull,
    QueueTimeout,
    QuotaExceeded,
    ReplicaLost,
    ServiceError,
    SessionNotHeld,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from services.gateway.grpc import status_of_errors
from services.gateway.http import error_response

S = grpc.StatusCode
# (error, HTTP status, gRPC status, code, retry-after)
CASES = [
    (InvalidArgument("height=7 must be a multiple of 16", "height"), 400, S.INVALID_ARGUMENT,
     "invalid_value", None),
    (Unauthenticated("no API key"), 401, S.UNAUTHENTICATED, "invalid_api_key", None),
    (NotFound("no video 'video_x'"), 404, S.NOT_FOUND, "not_found", None),
    (SessionNotHeld("session s1 is not held here"), 409, S.FAILED_PRECONDITION,
     "session_not_held", None),
    (ReplicaLost("the replica is gone"), 409, S.FAILED_PRECONDITION, "replica_lost", None),
    (TooLarge("a body of 9 MB; the limit is 1 MB"), 413, S.INVALID_ARGUMENT,
     "request_too_large", None),
    (QueueFull("256 sessions open", retry_after_s=5), 429, S.RESOURCE_EXHAUSTED, "queue_full", 5),
    (QuotaExceeded("max_videos 2", "max_videos", retry_after_s=7), 429, S.RESOURCE_EXHAUSTED,
     "quota_exceeded", 7),
    (QuotaExceeded("max_frames 81", "num_frames"), 429, S.RESOURCE_EXHAUSTED, "quota_exceeded",
     None),
    (AtCapacity("holds 4 of 4 sessions"), 503, S.RESOURCE_EXHAUSTED, "at_capacity", None),
    (QueueTimeout("waited 600 s"), 503, S.DEADLINE_EXCEEDED, "queue_timeout", None),
    (Unavailable("storage does not answer"), 503, S.UNAVAILABLE, "service_unavailable", None),
]  # fmt: skip


@pytest.mark.parametrize(("err", "http", "status", "code", "retry"), CASES,
                         ids=[type(c[0]).__name__ + str(c[4] or "") for c in CASES])  # fmt: skip
def test_each_error_has_its_http_status_and_body(err, http, status, code, retry):
    response = error_response(err)
    assert response.status_code == http
    body = json.loads(response.body)["error"]
    assert body == {"message": err.message, "type": err.error_type, "param": err.param,
                    "code": code}  # fmt: skip
    assert response.headers.get("retry-after") == (None if retry is None else str(retry))
    if isinstance(err, Unauthenticated):
        assert response.headers["www-authenticate"] == "Bearer"
    assert body["type"] == ("invalid_request_error" if http in (400, 401, 404, 413) else
                            "rate_limit_error" if http == 429 else "server_error")  # fmt: skip


@pytest.mark.parametrize(("err", "http", "status", "code", "retry"), CASES,
                         ids=[type(c[0]).__name__ + str(c[4] or "") for c in CASES])  # fmt: skip
def test_an_error_crosses_processes_whole(err, http, status, code, retry):
    back = pickle.loads(pickle.dumps(err))  # how a stage's error reaches the gateway (Ray)
    assert type(back) is type(err) and back.message == err.message and back.param == err.param
    assert getattr(back, "retry_after_s", None) == retry


@pytest.fixture(scope="module")
def raising_server():
    """A real gRPC server whose one method raises the error named by the request, inside the
    gateway's `status_of_errors`."""
    by_name = {type(c[0]).__name__ + str(c[4] or ""): c[0] for c in CASES}

    def call(request: bytes, context):
        name = request.decode()
        with status_of_errors(context, "Raise"):
            if name == "boom":
                raise RuntimeError("secret detail of a bug")
            raise by_name[name]

    handler = grpc.method_handlers_generic_handler(
        "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary("/test.Errors/Raise")
    channel.close()
    server.stop(None)


def _fail(method, name: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(name.encode(), timeout=10)
    return caught.value


@pytest.mark.parametrize(("err", "http", "status", "code", "retry"), CASES,
                         ids=[type(c[0]).__name__ + str(c[4] or "") for c in CASES])  # fmt: skip
def test_each_error_has_its_grpc_status(raising_server, err, http, status, code, retry):
    failed = _fail(raising_server, type(err).__name__ + str(retry or ""))
    assert failed.code() == status and failed.details() == err.message
    trailers = dict(failed.trailing_metadata() or ())
    assert trailers.get("retry-after") == (None if retry is None else str(retry))


def test_an_unexpected_failure_is_internal_with_an_error_id_and_no_detail(raising_server):
    failed = _fail(raising_server, "boom")
    assert failed.code() == S.INTERNAL
    assert "secret" not in failed.details() and "quote err_" in failed.details()


def test_every_service_error_kind_is_covered():
    def kinds(cls):
        return {cls} | {k for sub in cls.__subclasses__() for k in kinds(sub)}

    covered = {type(c[0]) for c in CASES}
    internal = {k for k in kinds(ServiceError) if k.__name__ == "Internal"}
    assert kinds(ServiceError) - {ServiceError} - internal - covered == set()
