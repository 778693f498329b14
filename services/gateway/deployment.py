"""The gateway deployment: Serve's ingress for HTTP (the OpenAI Videos and Models API,
WebSocket sessions, health, metrics) and gRPC (`histream.v1.HiStream`). It holds no model: it
composes the three transports' APIs (routes and RPCs, inherited) over one `GatewayCore`."""

import functools

from ray import serve

from services.gateway.core import GatewayCore
from services.gateway.grpc import GrpcApi
from services.gateway.http import HttpApi, api
from services.gateway.page import PageApi
from services.gateway.websocket import WebSocketApi
from services.link import GrpcStage, client_credentials
from services.link.replicas import stage_link
from services.logs import through_serve
from services.sessions import StageHandles
from services.settings import ServeSettings


@serve.ingress(api)
class Gateway(HttpApi, WebSocketApi, GrpcApi, PageApi):
    def __init__(
        self, settings: ServeSettings, structure, refine, decode, mailbox=None, *steps
    ) -> None:
        through_serve()
        link = functools.partial(stage_link, settings)  # the handle, or a gRPC link to it
        # a standalone decode server (histream decode-server), or the DecodePool deployment
        decode = decode_link(settings) if settings.decode_target else link(decode, "DecodeStage")
        handles = StageHandles(
            link(structure, "DenoiseStage", "TextEncoder"),
            link(refine, "DenoiseStage"),
            decode,
            settings.stage_call_timeout_s,
            steps=tuple(link(step, "DenoiseStage") for step in steps),
        )
        self.core = GatewayCore(settings, handles, mailbox)
        # Serve runs the constructor on the replica's event loop: jobs a dead replica left are
        # taken up from the start (and check_health restarts the loops should one have ended)
        self.core.start_background()

    async def drain(self) -> dict[str, int]:
        """Shutting down (`histream serve` on SIGTERM): see GatewayCore.drain."""
        return await self.core.drain(self.core.settings.drain_timeout_s)

    async def __del__(self) -> None:
        """Serve's graceful shutdown of this replica (a scale-down, a rolling update)."""
        if not self.core.draining:
            await self.core.drain(self.core.settings.drain_timeout_s)

    async def check_health(self) -> None:
        """Serve's periodic health check: the replica's loop runs; background work started."""
        self.core.start_background()

    def active_sessions(self) -> dict[str, int]:
        """Sessions this replica drives, by kind (for tests and benchmarks)."""
        return self.core.active_sessions()


def decode_link(settings: ServeSettings) -> GrpcStage:
    """The decode stage over gRPC at `decode_target`, each call within stage_call_timeout_s."""
    assert settings.decode_target is not None
    tls = client_credentials(settings.decode_tls_ca) if settings.decode_tls_ca else None
    return GrpcStage(
        settings.decode_target, "DecodeStage", settings.get_preset(),
        settings.stage_call_timeout_s, tls,
    )  # fmt: skip
