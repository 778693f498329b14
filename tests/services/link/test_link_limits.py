"""The gRPC stage link's limits and safeguards, without Ray: deadlines, a server's health while it
stops, which calls gRPC retries, client certificates, and TLS to servers dialled by address
(README, *Stage transports*)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from histream_model.config import get_preset
from protos.histream.v1 import stages_pb2
from services.errors import ReplicaLost
from services.link import GrpcStage, StageServer, client_credentials, tls_credentials
from services.link.client import Channels, service_config
from services.settings import ServeSettings
from tests.services.link.certs import make_cert

TINY = get_preset("tiny")
TOUCH = stages_pb2.ReleaseRequest(session_id="s")


class Slow:
    """A stage whose every RPC answers after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.answered = 0

    def __getattr__(self, name: str):
        async def rpc(request):
            await asyncio.sleep(self.delay_s)
            self.answered += 1
            return stages_pb2.StageAck(session_id=request.session_id)

        return rpc


def serve(stage, address: str = "127.0.0.1:0", credentials=None) -> tuple[StageServer, int]:
    server = StageServer(stage, "DecodeStage", address, TINY, credentials)
    return server, server.start()


def test_a_call_past_its_deadline_is_a_lost_replica():
    """stage_call_timeout_s is every call's gRPC deadline; a call past it is ReplicaLost (the
    driver restores the session elsewhere)."""
    server, port = serve(Slow(delay_s=3))
    link = GrpcStage(f"127.0.0.1:{port}", "DecodeStage", TINY, timeout_s=0.3)

    async def ask():
        try:
            await link.Touch.remote(TOUCH)
        finally:
            await link.close()

    try:
        with pytest.raises(ReplicaLost, match="DEADLINE_EXCEEDED"):
            asyncio.run(ask())
    finally:
        server.stop(grace_s=0)


def test_a_stopping_server_says_not_serving_while_its_calls_finish():
    stage = Slow(delay_s=1.5)
    server, port = serve(stage)
    link = GrpcStage(f"127.0.0.1:{port}", "DecodeStage", TINY, timeout_s=10)
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 5})

    async def go() -> tuple[bool, bool]:
        call = asyncio.create_task(link.Touch.remote(TOUCH))
        await asyncio.sleep(0.3)  # the call is in flight
        serving_before = await link.healthy()
        stopper.start()
        await asyncio.sleep(0.3)
        serving_while_stopping = await link.healthy(timeout_s=2)
        reply = await call  # the grace lets it finish
        assert reply.session_id == "s"
        await link.close()
        return serving_before, serving_while_stopping

    try:
        assert asyncio.run(go()) == (True, False)
    finally:
        stopper.join(timeout=30)
    assert stage.answered == 1


def test_grpc_retries_only_the_idempotent_calls_three_times_on_unavailable():
    (policy,) = json.loads(service_config())["methodConfig"]
    names = {(n["service"], n["method"]) for n in policy["name"]}
    assert names == {
        ("histream.v1.TextEncoder", "EncodePrompt"),
        ("histream.v1.DenoiseStage", "Touch"),
        ("histream.v1.DecodeStage", "Touch"),
    }
    retry = policy["retryPolicy"]
    assert retry["maxAttempts"] == 3 and retry["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert (retry["initialBackoff"], retry["maxBackoff"]) == ("0.1s", "1s")


def test_a_client_ca_makes_the_server_require_client_certificates(tmp_path):
    cert, key = make_cert(tmp_path, "localhost")
    client_cert, client_key = make_cert(tmp_path, "gateway")
    server, port = serve(Slow(0), "localhost:0", tls_credentials(cert, key, client_ca=client_cert))
    target = f"localhost:{port}"
    with_cert = GrpcStage(
        target, "DecodeStage", TINY, 10, client_credentials(cert, client_cert, client_key)
    )
    without = GrpcStage(target, "DecodeStage", TINY, 10, client_credentials(cert))

    async def ask() -> tuple[bool, bool]:
        try:
            return await with_cert.healthy(), await without.healthy(timeout_s=2)
        finally:
            await with_cert.close()
            await without.close()

    try:
        assert asyncio.run(ask()) == (True, False)
    finally:
        server.stop(grace_s=0)


def test_stage_tls_server_name_reaches_replicas_dialled_by_address(tmp_path):
    """Replicas are dialled by IP; a cert naming the service instead is accepted under
    stage_tls_server_name, and refused without it."""
    cert, key = make_cert(tmp_path, "histream-stage")
    server, port = serve(Slow(0), "127.0.0.1:0", tls_credentials(cert, key))
    named = Channels(TINY, client_credentials(cert), server_name="histream-stage")
    unnamed = Channels(TINY, client_credentials(cert))
    target, service = f"127.0.0.1:{port}", "histream.v1.DecodeStage"

    async def ask() -> tuple[bool, bool]:
        try:
            return await named.healthy(target, service), await unnamed.healthy(target, service, 2)
        finally:
            await named.close()
            await unnamed.close()

    try:
        assert asyncio.run(ask()) == (True, False)
    finally:
        server.stop(grace_s=0)
    settings = ServeSettings(stage_transport="grpc", stage_tls_server_name="histream-stage")
    assert settings.stage_grpc_host == "0.0.0.0"  # every interface by default
