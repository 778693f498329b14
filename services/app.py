"""The Serve application: five deployments, each scaled and resourced on its own.

    Gateway (ingress: HTTP + gRPC) -> StructureStage (low-res, KV_low, text encoder)
                                   -> RefineStage    (high-res, KV_high, drives the commits)
                                   -> DecodePool     (streaming VAE -> fMP4 -> storage)
                                   -> SessionMailbox (one replica: a session's control calls
                                                      reach the gateway replica driving it)
                                   -> StepStage1..N  (pipeline_workers > 0: HiAR's step caches,
                                                      a share each, chunks as a wavefront)

Stages are called with the `stages.proto` messages, routed by session id with Serve's
consistent-hash router without fallback replicas: a session's requests always reach the replica
that holds its caches while the replica set is unchanged. `stage_transport` says how: through
the deployment handles ("handle"), or ("grpc") to each replica's own gRPC server, found by a
`StageAddress` call routed the same way (services/link/replicas.py).

`app_builder` is the `import_path` of serve configs (`services.app:app_builder`), with the
`ServeSettings` fields as `args`; `build_app` is what `histream serve` runs.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from services.control import Mailbox
from services.gateway.deployment import Gateway
from services.protocol import StageName
from services.settings import ServeSettings
from services.stages import DecodeStage, RefineStage, StepStage, StructureStage

APP_NAME = "histream"
# the names serve configs refer to (the step workers only with pipeline_workers > 0)
DEPLOYMENTS = tuple(str(name) for name in StageName if name.worker is None)
GRPC_SERVICERS = ["services.protocol.servicer.add_HiStreamServicer_to_server"]
# Room for short requests (health, polling, job submissions) beside the gateway's open sessions,
# so that no number of sessions can make a health check queue.
GATEWAY_SHORT_REQUESTS = 256
# Every gateway replica holds one long poll to the mailbox, and each control call one more.
MAILBOX_ONGOING_REQUESTS = 4096
SESSION_ROUTER = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_fallback_replicas": 0},
)


def _stage(cls: type, name: StageName, settings: ServeSettings):
    scaling = {
        StageName.STRUCTURE: settings.structure,
        StageName.REFINE: settings.refine,
        StageName.DECODE: settings.decode,
    }.get(name, settings.step)
    return serve.deployment(
        cls,
        name=str(name),
        request_router_config=SESSION_ROUTER,
        logging_config=logging_config(settings),
        **scaling.deployment_options(),
    )


def logging_config(settings: ServeSettings) -> dict:
    return {"encoding": settings.log_encoding}


def build_app(settings: ServeSettings | None = None) -> Application:
    settings = settings or ServeSettings()
    structure = _stage(StructureStage, StageName.STRUCTURE, settings).bind(settings)
    refine = _stage(RefineStage, StageName.REFINE, settings).bind(settings, structure)
    decode = (  # a standalone decode server instead (decode_target): reached over gRPC
        None
        if settings.decode_target
        else _stage(DecodeStage, StageName.DECODE, settings).bind(settings)
    )
    steps = [
        _stage(StepStage, StageName.step(w), settings).bind(settings, w)
        for w in range(settings.pipeline_workers)
    ]
    mailbox = serve.deployment(
        Mailbox,
        name=str(StageName.MAILBOX),
        num_replicas=1,
        max_ongoing_requests=MAILBOX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
        logging_config=logging_config(settings),
    ).bind()
    ongoing = settings.max_live_sessions + GATEWAY_SHORT_REQUESTS
    gateway = serve.deployment(
        Gateway,
        name=str(StageName.GATEWAY),
        logging_config=logging_config(settings),
        **settings.gateway.deployment_options(ongoing),
    )
    return gateway.bind(settings, structure, refine, decode, mailbox, *steps)


def app_builder(args: dict) -> Application:
    """Serve config entry point: `args` are ServeSettings fields; the environment fills the rest."""
    return build_app(ServeSettings(**(args or {})))
