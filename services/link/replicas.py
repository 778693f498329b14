"""The `grpc` stage transport: each stage replica serves its stages.proto services on a gRPC
port of its own (`LinkedStage`), and callers reach a session's replica there (`ReplicaLink`).

Which replica holds a session stays Serve's decision, made as with the `handle` transport: the
consistent-hash router over the session id, asked through the deployment handle
(`StageAddress`, a call routed like every other of the session) whenever the session is placed
(OpenSession/OpenStream, RestoreSession/RestoreStream) or its replica failed it. The answer, the
replica's "host:port", is kept for the session; its other calls (every phase and decode, with
the latents) go straight to that server over gRPC with a deadline. A kept address is dropped on
ReplicaLost or SessionNotHeld (the driver restores, which places the session afresh) and when
the session is closed or finished. Only session-less calls (a prompt's encoding) ask anew each time.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import grpc
import ray

from histream_model.config import Preset
from services.errors import ReplicaLost, SessionNotHeld, remote_result
from services.link.client import Channels, Remote, client_credentials, stage_methods
from services.link.server import StageServer, tls_credentials
from services.protocol.routing import own_request_id
from services.settings import ServeSettings

PLACING = frozenset({"OpenSession", "OpenStream", "RestoreSession", "RestoreStream"})
CLOSING = frozenset({"CloseSession", "CloseStream", "FinishStream"})  # the session is gone
KEPT_SESSIONS = 4096  # addresses a link keeps (oldest dropped first); more sessions re-ask


class ReplicaLink:
    """A stage deployment over the `grpc` transport, with a deployment handle's surface:
    `options(session_id=...).RunPhase.remote(request)`; `stats` still goes by the handle."""

    def __init__(
        self,
        handle: Any,
        services: tuple[str, ...],
        preset: Preset,
        timeout_s: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        self.handle = handle
        self.methods = stage_methods(services)
        self.timeout_s = timeout_s
        self.channels = Channels(preset, credentials, server_name)
        self.addresses: OrderedDict[str, str] = OrderedDict()  # session id -> "host:port"

    def options(self, session_id: str | None = None, **_: object) -> _Pinned:
        return _Pinned(self, session_id or None)

    def __getattr__(self, name: str) -> Any:
        if name not in self.__dict__.get("methods", {}):
            raise AttributeError(name)
        return getattr(_Pinned(self, None), name)

    @property
    def stats(self) -> Any:
        return self.handle.stats

    async def address(self, session_id: str | None, fresh: bool = False) -> str:
        """The gRPC address of the replica Serve routes `session_id`'s calls to."""
        if session_id is not None and not fresh and session_id in self.addresses:
            return self.addresses[session_id]
        own_request_id()  # see services/protocol/routing.py
        handle = self.handle.options(session_id=session_id) if session_id else self.handle
        found = await remote_result(handle.StageAddress.remote(), self.timeout_s)
        if session_id is not None:
            self.addresses[session_id] = found
            self.addresses.move_to_end(session_id)
            while len(self.addresses) > KEPT_SESSIONS:
                self.addresses.popitem(last=False)
        return found

    async def call(self, session_id: str | None, name: str, request: Any) -> Any:
        target = await self.address(session_id, fresh=name in PLACING)
        try:
            reply = await self.channels.call(target, self.methods[name], request, self.timeout_s)
        except (ReplicaLost, SessionNotHeld):
            self.forget(session_id)
            raise
        if name in CLOSING:
            self.forget(session_id)
        return reply

    def forget(self, session_id: str | None) -> None:
        if session_id is not None:
            self.addresses.pop(session_id, None)


class _Pinned:
    """A link's calls under one session id (None: any replica)."""

    def __init__(self, link: ReplicaLink, session_id: str | None) -> None:
        self._link, self._session_id = link, session_id

    def __getattr__(self, name: str) -> Remote:
        if name not in self._link.methods:
            raise AttributeError(name)
        return Remote(self._send, name)

    def _send(self, name: str, request: Any):
        return self._link.call(self._session_id, name, request)


def stage_link(settings: ServeSettings, handle: Any, *services: str) -> Any:
    """The handle itself with `stage_transport` "handle"; with "grpc", a ReplicaLink to the
    deployment's replicas' gRPC servers (`services`: those of stages.proto it is called by)."""
    if settings.stage_transport == "handle" or handle is None:
        return handle
    tls = client_credentials(settings.stage_tls_ca) if settings.stage_tls_ca else None
    return ReplicaLink(
        handle, services, settings.get_preset(), settings.stage_call_timeout_s, tls,
        settings.stage_tls_server_name,
    )  # fmt: skip


class LinkedStage:
    """What a stage replica adds for the `grpc` transport: its services on a gRPC server of its
    own (started by the first `StageAddress` call, on the replica's loop), and that server's
    address for callers. Mixed into SessionStage; `grpc_services` names the services."""

    grpc_services: tuple[str, ...] = ()
    settings: ServeSettings

    _link_server: StageServer | None = None
    _link_address: str | None = None
    _link_lock: asyncio.Lock | None = None

    async def StageAddress(self) -> str:
        """ "host:port" of this replica's stage server (started on the first call)."""
        if self.settings.stage_transport != "grpc":
            raise RuntimeError("StageAddress is asked only with stage_transport=grpc")
        if self._link_lock is None:
            self._link_lock = asyncio.Lock()
        async with self._link_lock:
            if self._link_address is None:
                s = self.settings
                tls = None
                if s.stage_tls_cert and s.stage_tls_key:
                    tls = tls_credentials(s.stage_tls_cert, s.stage_tls_key)
                server = StageServer(
                    self, self.grpc_services, f"{s.stage_grpc_host}:0", s.get_preset(), tls
                )
                port = await server.serve()
                self._link_server = server
                self._link_address = f"{advertised_host(s)}:{port}"
        return self._link_address

    async def close_link(self, grace_s: float = 5.0) -> None:
        """Stop serving (health NOT_SERVING first); calls in flight get `grace_s`."""
        if self._link_server is not None:
            await self._link_server.close(grace_s)
            self._link_server = self._link_address = None


def advertised_host(settings: ServeSettings) -> str:
    """The host callers dial: this node's address (a pod's IP on Kubernetes), unless bound to
    one interface."""
    if settings.stage_grpc_host not in ("0.0.0.0", "[::]", "::"):
        return settings.stage_grpc_host
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
