"""Starting and stopping the service on a local Ray (what `histream serve` does).

Every listener binds to the configured host (127.0.0.1 by default): Serve's HTTP proxy, and the
gRPC API through `GrpcFront` in this process (Serve's gRPC proxy would listen on every
interface). Ray's own ports listen on every interface and Ray offers no way to bind them; a
local Ray therefore runs with Ray's token authentication (`RAY_AUTH_MODE=token`, its token file
readable by this user only), so nothing without the token can call into the cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from services.app import APP_NAME, build_app
from services.local.grpc_front import GrpcFront
from services.protocol import StageName
from services.settings import ServeSettings

log = logging.getLogger("histream.server")
_fronts: list[GrpcFront] = []  # the gRPC front of the local service, while it runs
_apps: list[str] = []  # the applications started here


def start(
    settings: ServeSettings,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    log_to_driver: bool = True,
) -> None:
    """Start (or join) Ray, Serve's HTTP proxy and the gRPC front, deploy the application.

    Returns once every deployment is healthy. A second call with another `app_name` and
    `route_prefix` adds another application beside the first (the listeners are shared; gRPC
    calls name theirs in the `application` metadata).
    """
    if not ray.is_initialized():
        # A new local Ray runs with token auth unless RAY_AUTH_MODE says otherwise (Ray's own
        # default); joining a cluster takes the cluster's token from the environment.
        ray.init(
            address=ray_address,
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,  # replica logs stay in Ray's session log files either way
        )
        _protect_token()
        # No gRPC servicers: Serve starts no gRPC proxy; the front below serves the API.
        serve.start(
            http_options=HTTPOptions(host=settings.http_host, port=settings.http_port),
            grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[]),
        )
    serve.run(
        build_app(settings),
        name=app_name,
        route_prefix=route_prefix,
        external_scaler_enabled=settings.external_scaler,
    )
    _apps.append(app_name)
    if not _fronts:
        front = GrpcFront(settings.grpc_bind_host, settings.grpc_port, default_app=app_name)
        front.start()
        _fronts.append(front)
    log.info(
        "serving %s (preset %s) on http://%s:%d and gRPC %s:%d",
        app_name,
        settings.preset,
        settings.http_host,
        settings.http_port,
        settings.grpc_bind_host,
        settings.grpc_port,
    )


def _protect_token() -> None:
    """Ray writes its token file readable by everyone; only this user needs to read it."""
    token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.path.isfile(token):
        os.chmod(token, 0o600)


def drain(timeout_s: float) -> dict[str, int]:
    """Suspend every session and job of every application here (see GatewayCore.drain)."""
    total = {"sessions": 0, "jobs": 0}
    for app in _apps:
        gateway = serve.get_deployment_handle(str(StageName.GATEWAY), app_name=app)
        try:
            drained = gateway.drain.remote().result(timeout_s=timeout_s + 10)
        except Exception:
            log.exception("draining application %s failed", app)
            continue
        for kind, count in drained.items():
            total[kind] += count
    return total


def stop() -> None:
    """Stop the gRPC front, shut Serve down (draining replicas) and stop the local Ray."""
    _apps.clear()
    while _fronts:
        _fronts.pop().stop()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_forever(settings: ServeSettings, ray_address: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain (sessions and jobs suspended where they stand,
    to go on later) and shut down cleanly."""
    stopping = threading.Event()
    stops = {signal.SIGINT, signal.SIGTERM}
    # Held back while Ray starts (its threads inherit the mask), since ray.init installs a
    # SIGTERM handler that exits at once; a signal sent meanwhile waits for ours below.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        start(settings, ray_address=ray_address)
        for sig in stops:
            signal.signal(sig, lambda *_: stopping.set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    print(
        f"HiStream Serve ({settings.served_model}) on http://{settings.http_host}:"
        f"{settings.http_port} and gRPC {settings.grpc_bind_host}:{settings.grpc_port}; "
        "Ctrl-C stops",
        flush=True,
    )
    stopping.wait()
    print("shutting down...", flush=True)
    drained = drain(settings.drain_timeout_s)
    stop()
    print(
        f"stopped: {drained['sessions']} sessions and {drained['jobs']} jobs suspended "
        "(resume them by id / they go on after a restart)",
        flush=True,
    )


def kill_replica(app: str, deployment: str) -> str:
    """Fault injection (tests, benchmarks): kill the first replica actor of `deployment` in
    `app` as a crash would (no graceful shutdown); Serve starts another. Returns its name."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in name:
            ray.kill(ray.get_actor(name, namespace=actor["namespace"]), no_restart=True)
            return name
    raise LookupError(f"no replica of {app}/{deployment} among the named actors")


def free_port() -> int:
    """A TCP port free on this machine right now (for tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
