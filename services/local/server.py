"""Starting and stopping the service on a local Ray (what `histream serve` does)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from services.app import APP_NAME, GRPC_SERVICERS, build_app
from services.settings import ServeSettings

log = logging.getLogger("histream.server")


def start(
    settings: ServeSettings,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    log_to_driver: bool = True,
) -> None:
    """Start (or join) Ray, start Serve's HTTP and gRPC proxies, deploy the application.

    Returns once every deployment is healthy. A second call with another `app_name` and
    `route_prefix` adds another application beside the first (the proxies are shared).
    """
    if not ray.is_initialized():
        # Token auth guards multi-user clusters; a local embedded Ray has no other users.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address=ray_address,
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,  # replica logs stay in Ray's session log files either way
        )
        serve.start(
            http_options=HTTPOptions(host=settings.http_host, port=settings.http_port),
            grpc_options=gRPCOptions(
                port=settings.grpc_port, grpc_servicer_functions=GRPC_SERVICERS
            ),
        )
    serve.run(build_app(settings), name=app_name, route_prefix=route_prefix)
    log.info(
        "serving %s (preset %s) on http://%s:%d and gRPC :%d",
        app_name,
        settings.preset,
        settings.http_host,
        settings.http_port,
        settings.grpc_port,
    )


def stop() -> None:
    """Shut Serve down (draining replicas) and stop the local Ray."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_forever(settings: ServeSettings, ray_address: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    start(settings, ray_address=ray_address)
    print(
        f"HiStream Serve ({settings.served_model}) on http://{settings.http_host}:"
        f"{settings.http_port} and gRPC {settings.http_host}:{settings.grpc_port}; Ctrl-C stops",
        flush=True,
    )
    stopping.wait()
    print("shutting down...", flush=True)
    stop()


def free_port() -> int:
    """A TCP port free on this machine right now (for tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
