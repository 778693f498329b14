"""The grpc stage transport on a local Ray (app "local" of the service fixture runs on it):
every stage replica serves its stages.proto services on a gRPC port of its own, with standard
health checking, server reflection (what grpcurl lists) and service errors as status codes.
The pipeline's latents over it are checked against the in-process generator in
test_service.py (bit exact, every mode, and the WebSocket and gRPC sessions)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos.histream.v1 import stages_pb2
from tests.services.service_calls import stage

SERVICES = {
    "StructureStage": {"histream.v1.DenoiseStage", "histream.v1.TextEncoder"},
    "RefineStage": {"histream.v1.DenoiseStage"},
    "DecodePool": {"histream.v1.DecodeStage"},
}


@pytest.mark.parametrize("deployment", sorted(SERVICES))
def test_each_stage_replica_serves_its_services_with_health_and_reflection(service, deployment):
    address = stage(deployment, "local").StageAddress.remote().result(timeout_s=30)
    assert int(address.rsplit(":", 1)[1]) > 0
    with grpc.insecure_channel(address) as channel:
        listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert SERVICES[deployment] | {"grpc.health.v1.Health"} <= listed
        assert "histream.v1.DecodeStage" not in listed or deployment == "DecodePool"
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICES[deployment]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # asked again: the same server (one per replica, started once)
    assert stage(deployment, "local").StageAddress.remote().result(timeout_s=30) == address


def _call(address: str, path: str, request, response):
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary(
            path, request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as raw:
            method(request, timeout=30)
    return raw.value


def test_stage_errors_are_status_codes_on_a_replica(service):
    refine = stage("RefineStage", "local").StageAddress.remote().result(timeout_s=30)
    lost = _call(
        refine, "/histream.v1.DenoiseStage/RunPhase",
        stages_pb2.PhaseRequest(session_id="nobody", chunk_index=0, phase=0),
        stages_pb2.ChunkLatents,
    )  # fmt: skip
    assert lost.code() == grpc.StatusCode.FAILED_PRECONDITION and "nobody" in lost.details()
    assert ("histream-error-code", "session_not_held") in lost.trailing_metadata()

    structure = stage("StructureStage", "local").StageAddress.remote().result(timeout_s=30)
    long = "x" * (service.settings.max_prompt_chars + 1)
    bad = _call(
        structure, "/histream.v1.TextEncoder/EncodePrompt",
        stages_pb2.EncodePromptRequest(prompt=long), stages_pb2.EncodePromptResponse,
    )  # fmt: skip
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("histream-error-param", "prompt") in bad.trailing_metadata()


def test_the_handle_transport_starts_no_stage_server(service):
    with pytest.raises(Exception, match="stage_transport=grpc"):
        stage("RefineStage").StageAddress.remote().result(timeout_s=30)
