"""The gateway without Ray: its API classes (HTTP, WebSocket, gRPC, page) over one `GatewayCore`.
The routes of `services.gateway.http.api` are bound to that object, as Serve's ingress binds them
to a replica, and served by Starlette's TestClient (one event loop for the client's life; the
core's background work runs on it from start to a drain at exit) or by uvicorn (`serving`)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient

from services.gateway.core import GatewayCore
from services.gateway.grpc import GrpcApi
from services.gateway.http import HttpApi, api
from services.gateway.page import PageApi
from services.gateway.websocket import WebSocketApi
from services.sessions import StageHandles
from services.settings import ServeSettings
from services.storage import StorageSettings


class LocalGateway(HttpApi, WebSocketApi, GrpcApi, PageApi):
    """The gateway deployment's API classes over a core, with no Serve replica around them."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core


def bound(endpoint: Callable[..., Any], instance: object) -> Callable[..., Any]:
    """`endpoint(instance, ...)` with the signature FastAPI should read: without `self`."""
    signature = inspect.signature(endpoint)

    async def call(*args: Any, **kwargs: Any) -> Any:
        return await endpoint(instance, *args, **kwargs)

    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    call.__name__ = endpoint.__name__
    return call


def routes(router: Any) -> Iterator[Any]:
    """Every route under `router`. Once `services.gateway.deployment` is imported, Serve's
    ingress has moved the class's routes under an included router (FastAPI >= 0.137 keeps those
    as one `_IncludedRouter` node), their `self` a dependency on the replica: walked into here,
    and `self` is given explicitly."""
    for route in router.routes:
        if isinstance(route, APIRoute | APIWebSocketRoute):
            yield route
        elif hasattr(route, "original_router"):
            assert not route.include_context.prefix  # the gateway's routes have none
            yield from routes(route.original_router)


def app_of(core: GatewayCore) -> FastAPI:
    gateway = LocalGateway(core)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        core.start_background()  # on the client's loop, as Serve does on the replica's
        yield
        await core.drain(timeout_s=5)

    app = FastAPI(lifespan=lifespan)
    app.exception_handlers.update(api.exception_handlers)
    for route in routes(api.router):
        if isinstance(route, APIRoute):
            app.add_api_route(
                route.path, bound(route.endpoint, gateway), methods=sorted(route.methods),
                response_model=None, include_in_schema=route.include_in_schema,
            )  # fmt: skip
        elif isinstance(route, APIWebSocketRoute):
            app.add_api_websocket_route(route.path, bound(route.endpoint, gateway))
    return app


def settings_for(store: Path, **overrides: Any) -> ServeSettings:
    return ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(store)), **overrides)


@contextlib.contextmanager
def serving(settings: ServeSettings, handles: StageHandles) -> Iterator[str]:
    """The app on a real HTTP server (uvicorn, on its own thread and a free port), for clients
    that open their own connections (`histream submit`); yields its base URL."""
    import threading
    import time

    import uvicorn

    from services.local.server import free_port

    port = free_port()
    app = app_of(GatewayCore(settings, handles))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def gateway_client(
    settings: ServeSettings, handles: StageHandles
) -> Iterator[tuple[TestClient, GatewayCore]]:
    core = GatewayCore(settings, handles)
    with TestClient(app_of(core)) as client:
        yield client, core
