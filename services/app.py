"""The Serve application: four deployments, each scaled and resourced on its own.

    Gateway (ingress: HTTP + gRPC) -> StructureStage (low-res, KV_low, text encoder)
                                   -> RefineStage    (high-res, KV_high, drives the commits)
                                   -> DecodePool     (streaming VAE -> fMP4 -> storage)

Stages are called through deployment handles carrying the `stages.proto` messages, routed by
session id with Serve's consistent-hash router without fallback replicas: a session's requests
always reach the replica that holds its caches while the replica set is unchanged.

`app_builder` is the `import_path` of serve configs (`services.app:app_builder`), with the
`ServeSettings` fields as `args`; `build_app` is what `histream serve` runs.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from services.gateway import Gateway
from services.settings import ServeSettings
from services.stages import DecodeStage, RefineStage, StructureStage

APP_NAME = "histream"
GATEWAY, STRUCTURE, REFINE, DECODE = "Gateway", "StructureStage", "RefineStage", "DecodePool"
DEPLOYMENTS = (GATEWAY, STRUCTURE, REFINE, DECODE)  # the names serve configs refer to
GRPC_SERVICERS = ["protos.histream.v1.api_pb2_grpc.add_HiStreamServicer_to_server"]
SESSION_ROUTER = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_fallback_replicas": 0},
)


def build_app(settings: ServeSettings | None = None) -> Application:
    settings = settings or ServeSettings()
    structure = serve.deployment(
        StructureStage,
        name=STRUCTURE,
        request_router_config=SESSION_ROUTER,
        **settings.structure.deployment_options(),
    ).bind(settings)
    refine = serve.deployment(
        RefineStage,
        name=REFINE,
        request_router_config=SESSION_ROUTER,
        **settings.refine.deployment_options(),
    ).bind(settings, structure)
    decode = serve.deployment(
        DecodeStage,
        name=DECODE,
        request_router_config=SESSION_ROUTER,
        **settings.decode.deployment_options(),
    ).bind(settings)
    gateway = serve.deployment(Gateway, name=GATEWAY, **settings.gateway.deployment_options())
    return gateway.bind(settings, structure, refine, decode)


def app_builder(args: dict) -> Application:
    """Serve config entry point: `args` are ServeSettings fields; the environment fills the rest."""
    return build_app(ServeSettings(**(args or {})))
