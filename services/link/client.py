"""Calling stages over real gRPC with the surface of a Serve deployment handle, so the session
driver needs no other code: `handle.options(session_id=...).DecodeChunk.remote(request)` is an
awaitable of the reply. Every call has a deadline (stage_call_timeout_s); gRPC retries only the
idempotent calls (IDEMPOTENT below; the driver's restore-and-retry decides what else is safe to
repeat); service errors come back as themselves, a link that fails as ReplicaLost
(services/link/status.py).

`GrpcStage` is one server at a fixed target (a standalone decode server); `ReplicaLink`
(replicas.py) finds a session's replica through Serve and calls it here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histream_model.config import Preset
from protos.histream.v1 import stages_pb2
from services.errors import Unavailable
from services.link.server import channel_options
from services.link.status import from_rpc_error


def client_credentials(ca: str | None, cert: str | None = None, key: str | None = None):
    """TLS to a stage server: its CA (PEM), and this side's cert and key if it asks for one."""
    pem = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(pem(ca), pem(key), pem(cert))


# Retried by gRPC itself (on UNAVAILABLE, 3 attempts in all, backoff 0.1-1 s): only the calls
# that are idempotent, whose repeat cannot change a session's state. A phase, a decode, an
# open or a restore is not retried here; the session driver's restore-and-retry decides.
IDEMPOTENT = (("TextEncoder", "EncodePrompt"), ("DenoiseStage", "Touch"), ("DecodeStage", "Touch"))
RETRY_POLICY = {
    "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}  # fmt: skip


def service_config() -> str:
    names = [{"service": f"histream.v1.{s}", "method": m} for s, m in IDEMPOTENT]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


@dataclass(frozen=True)
class Method:
    """One RPC of stages.proto: where it goes and how its reply reads."""

    service: str  # e.g. "DecodeStage"
    path: str  # "/histream.v1.DecodeStage/DecodeChunk"
    response: type

    @property
    def label(self) -> str:
        return f"{self.service}.{self.path.rsplit('/', 1)[1]}"


def stage_methods(services: str | tuple[str, ...]) -> dict[str, Method]:
    """The RPCs of these stages.proto services by name (the first service's wins a shared one,
    e.g. Touch)."""
    found: dict[str, Method] = {}
    for service in (services,) if isinstance(services, str) else services:
        descriptor = stages_pb2.DESCRIPTOR.services_by_name[service]
        for m in descriptor.methods:
            path = f"/{descriptor.full_name}/{m.name}"
            found.setdefault(m.name, Method(service, path, GetMessageClass(m.output_type)))
    return found


class Channels:
    """One channel per server ("host:port"), made on first use on the caller's event loop, with
    message limits from the preset and optional TLS."""

    def __init__(
        self,
        preset: Preset,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        self.options: list[tuple[str, Any]] = channel_options(preset)
        self.options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config())]
        if server_name:  # the name the servers' TLS certs carry, when dialled by address
            self.options.append(("grpc.ssl_target_name_override", server_name))
        self.credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # the loop each was made on
        self._stubs: dict[tuple[str, str], Any] = {}  # (target, path) -> its channel's callable
        self.sent_bytes = self.received_bytes = 0  # message bytes of the calls answered

    def __call__(self, target: str) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        channel = self._channels.get(target)
        if channel is None or self._loops.get(target) is not loop:  # (one of an ended loop)
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(target, options=self.options)
            else:
                channel = grpc.aio.secure_channel(target, self.credentials, options=self.options)
            self._channels[target], self._loops[target] = channel, loop
            self._stubs = {k: v for k, v in self._stubs.items() if k[0] != target}
        return channel

    def targets(self) -> list[str]:
        """The servers it has a channel to."""
        return list(self._channels)

    async def call(self, target: str, method: Method, request: Any, timeout_s: float | None):
        """One unary call; a failed one raises its service error (or ReplicaLost)."""
        channel = self(target)  # first: a new channel drops the target's callables
        stub = self._stubs.get((target, method.path))
        if stub is None:  # made once per channel and method, not per call
            stub = self._stubs[target, method.path] = channel.unary_unary(
                method.path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=method.response.FromString,
            )
        try:
            reply = await stub(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, method.label) from None
        self.sent_bytes += request.ByteSize()
        self.received_bytes += reply.ByteSize()
        return reply

    async def healthy(self, target: str, service: str, timeout_s: float = 5.0) -> bool:
        """Whether the server's health service says SERVING for `service` (a full name)."""
        stub = health_pb2_grpc.HealthStub(self(target))
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await stub.Check(request, timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self, target: str | None = None) -> None:
        """Close one server's channel, or every one."""
        targets = [target] if target is not None else list(self._channels)
        self._stubs = {k: v for k, v in self._stubs.items() if k[0] not in targets}
        for t in targets:
            channel = self._channels.pop(t, None)
            if self._loops.pop(t, None) is asyncio.get_running_loop() and channel is not None:
                await channel.close()


class Remote:
    """`Method.remote(request)` of a handle: an awaitable of the reply."""

    def __init__(self, send, name: str) -> None:
        self._send, self._name = send, name

    def remote(self, *request):
        return self._send(self._name, *request)


class GrpcStage:
    """A stages.proto `service` at `target` ("host:port"), one channel for every session."""

    def __init__(
        self,
        target: str,
        service: str,
        preset: Preset,
        timeout_s: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.service = stages_pb2.DESCRIPTOR.services_by_name[service].full_name
        self.methods = stage_methods(service)
        self.timeout_s = timeout_s
        self.channels = Channels(preset, credentials)

    def options(self, **_: object) -> GrpcStage:
        """Session affinity is the server's: there is one decode server per target."""
        return self

    def __getattr__(self, name: str) -> Any:
        if name not in self.__dict__.get("methods", {}):
            raise AttributeError(name)
        remote = Remote(self._send, name)
        setattr(self, name, remote)  # later calls find it without __getattr__
        return remote

    async def _send(self, name: str, request: Any) -> Any:
        return await self.channels.call(self.target, self.methods[name], request, self.timeout_s)

    @property
    def stats(self) -> Any:
        """What /readyz and /metrics ask of a stage: here, its health check."""
        return Remote(lambda _name: self._stats(), "stats")

    async def _stats(self) -> dict:
        if not await self.healthy():
            raise Unavailable(f"the stage server at {self.target} is not serving")
        return {"replica": self.target}

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether the server's health service says SERVING for this stage."""
        return await self.channels.healthy(self.target, self.service, timeout_s)

    async def close(self) -> None:
        await self.channels.close()
