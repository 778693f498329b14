"""A stage served over real gRPC, outside Ray: its `stages.proto` service (each RPC handed to the
stage object's method of that name), standard health checking (`grpc.health.v1.Health`:
SERVING once the model is loaded, NOT_SERVING while it stops), server reflection (grpcurl lists
the services), message limits sized from the preset's largest tensor, optional TLS from files.

`histream decode-server` runs the decode pool this way (README, *Stage transports*).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from histream_model.config import Preset
from protos.histream.v1 import stages_pb2
from services.errors import Internal, ServiceError
from services.link.status import trailers

log = logging.getLogger("histream.link")
RESTORE_CHUNKS = 16  # latents a restore request may carry: the anchor, the decoder's tail, slack


def message_limit(preset: Preset) -> int:
    """Bytes of the largest message a stage link carries: a restore request with
    RESTORE_CHUNKS chunks of float32 latents at the preset's largest size, plus 4 MiB."""
    vae = preset.vae
    h, w = preset.max_height // vae.spatial_stride, preset.max_width // vae.spatial_stride
    chunk = vae.z_dim * preset.options.chunk_frames * h * w * 4
    return RESTORE_CHUNKS * chunk + 4 * 2**20


def channel_options(preset: Preset) -> list[tuple[str, int]]:
    limit = message_limit(preset)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def tls_credentials(cert: str, key: str, client_ca: str | None = None):
    """Server credentials from PEM files (with `client_ca`: clients must present a cert)."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=bool(ca))


class StageServer:
    """`stage`'s RPCs as the `services` of stages.proto (e.g. "DecodeStage") on `address`.

    Two ways to run: `start()`/`stop()` on an event loop of its own thread (a stage object
    outside Ray: `histream decode-server`), or `await serve()`/`await close()` on the caller's
    loop (a Serve stage replica, whose RPC methods must run on the replica's own loop)."""

    def __init__(
        self,
        stage: object,
        services: str | tuple[str, ...],
        address: str,
        preset: Preset,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.stage = stage
        names = (services,) if isinstance(services, str) else services
        self.descriptors = [stages_pb2.DESCRIPTOR.services_by_name[n] for n in names]
        self.descriptor = self.descriptors[0]
        self.address = address
        self.port = 0
        self.options = channel_options(preset)
        self.credentials = credentials
        self.health = None  # made on the server's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def service_names(self) -> list[str]:
        return [d.full_name for d in self.descriptors]

    def start(self) -> int:
        """Serve on a thread of its own; returns the port (an address ending in :0 takes a
        free one)."""
        self._loop = asyncio.new_event_loop()
        # a daemon: a process told to stop exits even if a stuck call keeps the loop from ending
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="stage-server", daemon=True
        )
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.serve(), self._loop).result(timeout=60)

    def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, then calls in flight get `grace_s` to finish; then every other
        task of the thread's loop (the stage's reaper and the like) is cancelled. Idempotent."""
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop_all(grace_s), self._loop).result(grace_s + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def run(self, coro):
        """Run a coroutine on the server's loop (the stage's own calls, e.g. from tests)."""
        assert self._loop is not None, "run() is for a server started with start()"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def serve(self) -> int:
        """Serve on the running loop; returns the port."""
        server = grpc.aio.server(options=self.options)
        server.add_generic_rpc_handlers(tuple(self._handlers(d) for d in self.descriptors))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        if self.credentials is None:
            self.port = server.add_insecure_port(self.address)
        else:
            self.port = server.add_secure_port(self.address, self.credentials)
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s on port %d", ", ".join(self.service_names), self.port)
        return self.port

    async def close(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, then calls in flight get `grace_s` to finish. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace_s)

    async def _set_health(self, status) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def _stop_all(self, grace_s: float) -> None:
        await self.close(grace_s)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # the stage's reaper and the like
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _handlers(self, descriptor) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in descriptor.methods:
            request, response = map(GetMessageClass, (method.input_type, method.output_type))
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._unary(descriptor, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)

    def _unary(self, descriptor, name: str):
        method = getattr(self.stage, name)

        async def call(request, context: grpc.aio.ServicerContext):
            try:
                return await method(request)
            except ServiceError as err:
                error = err
            except Exception as err:  # a bug: the caller gets an error id, the log the rest
                error = Internal.logged(log, err, f"{descriptor.name}.{name}")
            context.set_trailing_metadata(trailers(error))
            await context.abort(error.grpc_status, error.message)

        return call
