"""Calling a stage over real gRPC with the surface of a Serve deployment handle, so the session
driver needs no other code: `handle.options(session_id=...).DecodeChunk.remote(request)` is an
awaitable of the reply. Every call has a deadline (stage_call_timeout_s); no call is retried here
(the driver's restore-and-retry decides what is safe to repeat); service errors come back as
themselves, a link that fails as ReplicaLost (services/link/status.py).
"""

from __future__ import annotations

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
        self.descriptor = stages_pb2.DESCRIPTOR.services_by_name[service]
        self.timeout_s = timeout_s
        self._options = channel_options(preset)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        """Made on first use, on the caller's event loop."""
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
        return self._channel

    def options(self, **_: object) -> GrpcStage:
        """Session affinity is the server's: there is one decode server per target."""
        return self

    def __getattr__(self, name: str) -> Any:
        method = self.descriptor.methods_by_name.get(name)
        if method is None:
            raise AttributeError(name)
        response = GetMessageClass(method.output_type)
        path = f"/{self.descriptor.full_name}/{name}"
        stage = self

        class Remote:  # made once per method: kept on the instance (see the end)
            @staticmethod
            async def remote(request):
                call = stage.channel().unary_unary(
                    path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response.FromString,
                )
                try:
                    return await call(request, timeout=stage.timeout_s)
                except grpc.RpcError as err:
                    raise from_rpc_error(err, f"{stage.descriptor.name}.{name}") from None

        setattr(self, name, Remote)  # later calls find it without __getattr__
        return Remote

    @property
    def stats(self) -> Any:
        """What /readyz and /metrics ask of a stage: here, its health check."""
        stage = self

        class Remote:
            @staticmethod
            async def remote() -> dict:
                if not await stage.healthy():
                    raise Unavailable(f"the stage server at {stage.target} is not serving")
                return {"replica": stage.target}

        return Remote

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether the server's health service says SERVING for this stage."""
        stub = health_pb2_grpc.HealthStub(self.channel())
        request = health_pb2.HealthCheckRequest(service=self.descriptor.full_name)
        try:
            reply = await stub.Check(request, timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
