"""The public gRPC API (`histream.v1.HiStream`) of a local service, bound to the configured host.

Serve's own gRPC proxy listens on every interface (its address is not configurable), so
`histream serve` does not start it: this front serves the API in the `histream serve` process on
`grpc_host:grpc_port` (127.0.0.1 by default) and hands each call to the gateway deployment of the
application its `application` metadata names, as Serve's proxy would. On Kubernetes the pods
use Serve's proxy (k8s/base/serve-config.yaml), where listening on the pod's interfaces is the
point.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

import grpc
from ray import serve

from services.errors import Internal, ServiceError, unwrap
from services.protocol import StageName
from services.protocol.servicer import SERVICE, add_HiStreamServicer_to_server

log = logging.getLogger("histream.grpc")


class GrpcFront:
    """A grpc.aio server on its own event-loop thread, forwarding to gateway deployments."""

    def __init__(self, host: str, port: int, default_app: str) -> None:
        self.address = f"{host}:{port}"
        self.default_app = default_app  # the application of calls without `application` metadata
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-front")

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        add_HiStreamServicer_to_server(self, self._server)
        if self._server.add_insecure_port(self.address) == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self._server.start()
        log.info("gRPC API on %s", self.address)

    def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            stopping = self._server.stop(grace_s)
            asyncio.run_coroutine_threadsafe(stopping, self._loop).result(timeout=grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _gateway(self, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata() or ())
        app = metadata.get("application") or self.default_app
        return serve.get_deployment_handle(str(StageName.GATEWAY), app_name=app)

    @staticmethod
    def _authorization(context: grpc.aio.ServicerContext) -> str | None:
        """The caller's `authorization` metadata, for the gateway to authenticate."""
        return dict(context.invocation_metadata() or ()).get("authorization")

    def __getattr__(self, name: str) -> Callable:
        """`CreateVideo`, `StreamSession`, ...: every method of the service, forwarded."""
        method = SERVICE.methods_by_name.get(name)
        if method is None:
            raise AttributeError(name)
        return self._stream(name) if method.server_streaming else self._unary(name)

    def _unary(self, name: str) -> Callable:
        async def call(request, context: grpc.aio.ServicerContext):
            try:
                auth = self._authorization(context)
                return await getattr(self._gateway(context), name).remote(
                    request, authorization=auth
                )
            except Exception as err:
                await _abort(context, err, name)

        return call

    def _stream(self, name: str) -> Callable:
        async def call(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
            handle = self._gateway(context).options(stream=True)
            auth = self._authorization(context)
            events = getattr(handle, name).remote(request, authorization=auth)
            try:
                async for event in events:
                    yield event
            except asyncio.CancelledError:  # the client went away: end the session
                events.cancel()
                raise
            except Exception as err:
                await _abort(context, err, name)

        return call


async def _abort(context: grpc.aio.ServicerContext, err: BaseException, name: str) -> None:
    cause = unwrap(err)
    failure = cause if isinstance(cause, ServiceError) else Internal.logged(log, err, name)
    retry = getattr(failure, "retry_after_s", None)
    if retry is not None:
        context.set_trailing_metadata((("retry-after", str(retry)),))
    await context.abort(failure.grpc_status, failure.message)
