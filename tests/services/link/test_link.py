"""The gRPC link between stages, without Ray: the real decode stage served by `StageServer`
(its own thread and event loop, as a separate process would have), a session driver calling it
through `GrpcStage` over a real gRPC channel, health checking, reflection, and service errors
mapped to status codes and back."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from histream_model.config import get_preset
from protos.histream.v1 import stages_pb2
from services.errors import Internal, ReplicaLost, SessionNotHeld, Unavailable
from services.link import GrpcStage, StageServer, client_credentials, message_limit, tls_credentials
from services.protocol import EndReason, StreamKind
from services.sessions import SessionDriver
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import StorageSettings
from tests.services.fakes import real_stages
from tests.services.harness import run, session_plan
from tests.services.link.certs import make_cert

TINY = get_preset("tiny")


@pytest.fixture
def decode_server(tmp_path):
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path / "s")))
    server = StageServer(DecodeStage(settings), "DecodeStage", "127.0.0.1:0", TINY)
    port = server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(grace_s=1)


def session(stages, plan) -> list:
    """Every chunk's (latents digest, media) of a 33-frame session through `stages`."""

    async def go():
        driver = SessionDriver(stages, plan)
        await driver.open()
        out = [(c.latents_sha256, c.media) async for c in driver.chunks()]
        await driver.finish(EndReason.COMPLETED)
        return out, driver.init_segment

    return run(go(), 60)


def test_a_session_decoded_over_grpc_streams_what_it_does_in_process(tmp_path, decode_server):
    _, target = decode_server
    plan = session_plan(StreamKind.SESSION, "histream+", 33, "sess_g", "a fox")
    local = real_stages(tmp_path / "local")
    linked = real_stages(tmp_path / "linked")
    handles = dataclasses.replace(linked.handles, decode=GrpcStage(target, "DecodeStage", TINY, 30))
    (here, init_here), (there, init_there) = session(local.handles, plan), session(handles, plan)
    assert len(there) == 3 and init_there == init_here
    assert there == here  # the same latents, and the same fMP4 bytes, over the link
    assert not linked.journal.find("DecodeChunk")  # the in-process decoder was not used


def test_health_reflection_and_errors_over_the_link(decode_server):
    _, target = decode_server
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "histream.v1.DecodeStage"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"histream.v1.DecodeStage", "grpc.health.v1.Health"} <= set(services)

    # a session the server does not hold: FAILED_PRECONDITION, its code in the trailers...
    decode = channel.unary_unary(
        "/histream.v1.DecodeStage/DecodeChunk",
        request_serializer=stages_pb2.ChunkLatents.SerializeToString,
        response_deserializer=stages_pb2.DecodedSegment.FromString,
    )
    with pytest.raises(grpc.RpcError) as raw:
        decode(stages_pb2.ChunkLatents(session_id="nobody"), timeout=10)
    assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("histream-error-code", "session_not_held") in raw.value.trailing_metadata()
    # ...raised as itself by the client handle, so a driver restores and retries
    stage = GrpcStage(target, "DecodeStage", TINY, timeout_s=10)

    async def ask():
        try:
            assert await stage.healthy()
            assert await stage.stats.remote() == {"replica": target}
            await stage.options(session_id="nobody").DecodeChunk.remote(
                stages_pb2.ChunkLatents(session_id="nobody")
            )
        finally:
            await stage.close()

    with pytest.raises(SessionNotHeld, match="nobody"):
        asyncio.run(ask())
    channel.close()


def test_a_link_whose_server_is_gone_is_a_lost_replica(decode_server):
    from services.errors import ReplicaLost

    server, target = decode_server
    server.stop(grace_s=0)
    stage = GrpcStage(target, "DecodeStage", TINY, timeout_s=5)

    async def ask():
        try:
            assert not await stage.healthy(timeout_s=2)
            await stage.Touch.remote(stages_pb2.ReleaseRequest(session_id="s"))
        finally:
            await stage.close()

    with pytest.raises(ReplicaLost, match="no answer over gRPC"):
        asyncio.run(ask())


def test_messages_are_sized_for_the_presets_largest_restore():
    # the 1.3B preset at 1920x1088: 16 x 3 x 136 x 240 float32 = 6.3 MB a chunk, 16 of them
    big = get_preset("wan2.1-1.3b") if "wan2.1-1.3b" in _presets() else None
    if big is not None:
        assert message_limit(big) > 16 * 16 * 3 * 136 * 240 * 4
    assert 4 * 2**20 < message_limit(TINY) < 64 * 2**20


def _presets() -> list[str]:
    from histream_model.config import PRESETS

    return list(PRESETS)


def test_the_link_serves_tls_from_files(tmp_path):
    cert, key = make_cert(tmp_path, "localhost")
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path / "s")))
    server = StageServer(
        DecodeStage(settings), "DecodeStage", "localhost:0", TINY, tls_credentials(cert, key)
    )
    port = server.start()
    secure = GrpcStage(f"localhost:{port}", "DecodeStage", TINY, 10, client_credentials(str(cert)))
    plain = GrpcStage(f"localhost:{port}", "DecodeStage", TINY, 10)

    async def ask() -> tuple[bool, bool]:
        try:
            return await secure.healthy(), await plain.healthy(timeout_s=2)
        finally:
            await secure.close()
            await plain.close()

    try:
        assert asyncio.run(ask()) == (True, False)  # TLS answers; plaintext gets nothing
    finally:
        server.stop(grace_s=0)


class Failing:
    """A stage whose every RPC raises the error it is given."""

    error: Exception = RuntimeError("no error set")

    def __getattr__(self, name: str):
        async def rpc(request):
            raise self.error

        return rpc


@pytest.fixture(scope="module")
def failing_server():
    stage = Failing()
    server = StageServer(stage, "DecodeStage", "127.0.0.1:0", TINY)
    port = server.start()
    try:
        yield stage, f"127.0.0.1:{port}"
    finally:
        server.stop(grace_s=0)


def touch_over_the_link(target: str) -> stages_pb2.StageAck:
    """A Touch through GrpcStage, as the session driver would make it."""

    async def ask():
        link = GrpcStage(target, "DecodeStage", TINY, timeout_s=10)
        try:
            return await link.Touch.remote(stages_pb2.ReleaseRequest(session_id="s"))
        finally:
            await link.close()

    return asyncio.run(ask())


def _service_errors() -> list[type]:
    from services.link.status import error_classes

    classes = {cls for cls in error_classes().values()} | {ReplicaLost, Unavailable, Internal}
    return sorted(classes, key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", _service_errors(), ids=lambda cls: cls.__name__)
def test_every_service_error_crosses_the_link_with_its_status_code(failing_server, cls):
    """Each error: its gRPC status on the wire (NOT_FOUND, RESOURCE_EXHAUSTED for AtCapacity,
    FAILED_PRECONDITION for SessionNotHeld, INVALID_ARGUMENT, ...), raised as itself again on
    the calling side with its message and param."""
    stage, target = failing_server
    stage.error = cls(f"a {cls.__name__} for the test", "some_param")
    channel = grpc.insecure_channel(target)
    touch = channel.unary_unary(
        "/histream.v1.DecodeStage/Touch",
        request_serializer=stages_pb2.ReleaseRequest.SerializeToString,
        response_deserializer=stages_pb2.StageAck.FromString,
    )
    with pytest.raises(grpc.RpcError) as raw:
        touch(stages_pb2.ReleaseRequest(session_id="s"), timeout=10)
    channel.close()
    assert raw.value.code() == cls.grpc_status
    assert raw.value.details() == f"a {cls.__name__} for the test"
    assert ("histream-error-code", cls.code) in raw.value.trailing_metadata()

    with pytest.raises(cls) as raised:
        touch_over_the_link(target)
    assert type(raised.value).code == cls.code and raised.value.param == "some_param"


def test_a_bug_in_a_stage_is_internal_with_an_error_id(failing_server):
    stage, target = failing_server
    stage.error = KeyError("a bug")

    with pytest.raises(Internal) as raised:
        touch_over_the_link(target)
    assert "a bug" not in raised.value.message  # the log has it, the caller an id


class FlakyOnce:
    """Touch and DecodeChunk fail once with UNAVAILABLE (a server restarting), then answer."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        async def rpc(request):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] == 1:
                raise Unavailable(f"{name} not yet")
            return stages_pb2.StageAck(session_id=request.session_id)

        return rpc


def test_only_idempotent_calls_are_retried_by_grpc():
    stage = FlakyOnce()
    server = StageServer(stage, "DecodeStage", "127.0.0.1:0", TINY)
    link = GrpcStage(f"127.0.0.1:{server.start()}", "DecodeStage", TINY, timeout_s=10)

    async def ask():
        try:
            touched = await link.Touch.remote(stages_pb2.ReleaseRequest(session_id="s"))
            assert touched.session_id == "s"  # the second attempt answered
            with pytest.raises(Unavailable, match="DecodeChunk not yet"):
                await link.DecodeChunk.remote(stages_pb2.ChunkLatents(session_id="s"))
        finally:
            await link.close()

    try:
        asyncio.run(ask())
    finally:
        server.stop(grace_s=0)
    assert stage.calls == {"Touch": 2, "DecodeChunk": 1}


def test_a_gateway_keeps_one_connection_to_the_decode_server(tmp_path, decode_server):
    """README, *Stage transports*: with `decode_target` set, a gateway replica reaches the
    decode server over one gRPC channel, one TCP connection, whatever its sessions."""
    import psutil

    from services.gateway.deployment import decode_link

    _, target = decode_server
    port = int(target.rsplit(":", 1)[1])
    settings = ServeSettings(preset="tiny", decode_target=target)
    decode = decode_link(settings)
    assert isinstance(decode, GrpcStage) and decode.timeout_s == settings.stage_call_timeout_s
    local = real_stages(tmp_path / "local")
    handles = dataclasses.replace(local.handles, decode=decode)

    async def go():
        async def one(sid: str) -> int:
            driver = SessionDriver(handles, session_plan(StreamKind.SESSION, "histream+", 33, sid))
            await driver.open()
            chunks = [c async for c in driver.chunks()]
            await driver.finish(EndReason.COMPLETED)
            return len(chunks)

        counts = await asyncio.gather(*(one(f"sess_{i}") for i in range(3)))
        connections = [
            c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        ]  # fmt: skip
        return counts, len(connections)

    counts, connections = run(go(), 60)
    assert counts == [3, 3, 3]
    assert decode.channels.targets() == [target] and connections == 1
