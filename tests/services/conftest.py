"""Shared fixtures of the service tests: storage backends (local and a real S3 endpoint)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from services.local.server import free_port
from services.settings import ServeSettings, StageScaling
from services.storage import LocalStorage, S3Storage, Storage, StorageSettings

ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key-do-not-log"
# Every byte value, so no backend gets away with text-mode or encoding mistakes.
BINARY = bytes(range(256)) * 3
VIDEO = b"\x00\x00\x00\x18ftypisom" + BINARY


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """'host:port' of an in-process moto S3 server on a free port."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line a request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"{host}:{port}"
        finally:
            server.stop()


def make_s3(endpoint: str, bucket: str | None = None, **kwargs: object) -> S3Storage:
    # A fresh bucket per test: moto's state lives as long as the server.
    bucket = bucket or f"test-{uuid.uuid4().hex[:16]}"
    return S3Storage(endpoint, bucket, ACCESS_KEY, SECRET_KEY, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    return make_s3(request.getfixturevalue("s3_endpoint"))


@dataclass(frozen=True)
class Service:
    """The running service: one local Ray, two applications of the tiny preset."""

    url: str  # app "histream": S3 storage (moto), content handed out as presigned URLs
    local_url: str  # app "local" under /local: a local storage directory, stage_transport=grpc
    grpc_target: str
    s3: S3Storage  # the bucket the first app writes to
    local: LocalStorage
    settings: ServeSettings


@pytest.fixture(scope="session")
def service(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from services.local import server

    bucket = f"svc-{uuid.uuid4().hex[:12]}"
    s3 = make_s3(s3_endpoint, bucket=bucket)
    stage = StageScaling(num_cpus=0)
    common = {
        "preset": "tiny",
        "http_port": free_port(),
        "grpc_port": free_port(),
        "max_sessions_per_replica": 4,
        "queue_timeout_s": 60,
        "session_resume_grace_s": 4,  # short: a lost client's caches go soon (test_resume)
        "job_lease_s": 3,  # short: a dead gateway's jobs are taken up soon (test_resume)
        # a call lost with a replica being removed is given up on in time (test_survival)
        "stage_call_timeout_s": 30,
        **{name: stage for name in ("gateway", "structure", "refine", "decode")},
    }
    s3_settings = ServeSettings(
        storage=StorageSettings(
            endpoint=s3_endpoint, bucket=bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY
        ),
        external_scaler=True,  # test_survival scales a stage up and down in place
        # HiAR sessions run as a wavefront on two step workers (test_service, test_resume)
        pipeline_workers=2,
        # the denoisers batch phases of sessions running at once: every service test's
        # digests equal the in-process generator's with batching on (the "local" app: off)
        phase_batch_size=4,
        step=stage,
        **common,
    )
    local_dir = tmp_path_factory.mktemp("local-storage")
    # small queues on the second app, to fill them in tests (test_load.py)
    # and a short resume window: a lost client's session ends for good soon (test_players)
    # and a low message rate (test_hostile_input)
    limits = {"max_running_jobs": 1, "max_queued_jobs": 1, "max_live_sessions": 2,
              "session_snapshot_ttl_s": 3, "max_message_rate": 2}  # fmt: skip
    # and the grpc stage transport: every call between its gateway and its stages, and the
    # refine stage's to the structure stage, goes over the replicas' own gRPC servers
    local_settings = ServeSettings(
        storage=StorageSettings(local_dir=str(local_dir)), stage_transport="grpc",
        **common, **limits,
    )  # fmt: skip
    server.start(s3_settings, num_cpus=4, log_to_driver=False)
    server.start(local_settings, app_name="local", route_prefix="/local")
    base = f"http://127.0.0.1:{common['http_port']}"
    try:
        yield Service(
            url=base,
            local_url=f"{base}/local",
            grpc_target=f"127.0.0.1:{common['grpc_port']}",
            s3=s3,
            local=LocalStorage(local_dir),
            settings=s3_settings,
        )
    finally:
        server.stop()


TENANT_KEYS = {"alpha": "sk-alpha-test-key-1", "bravo": "sk-bravo-test-key-2"}


def _one_session_high_res() -> int:
    """The bytes a 128x64 `histream+` session holds on the refine stage (float32 on the CPU):
    the tenants app's stage budget, so its refine replica admits exactly one such session."""
    from histream_model.config import get_mode, get_preset
    from histream_model.flops import cache_layout, kv_bytes, text_kv_bytes
    from histream_model.shape import VideoShape

    shape = VideoShape(get_preset("tiny"), get_mode("histream+"), 64, 128, 57)
    config = shape.preset.dit
    return kv_bytes(config, cache_layout(shape, "high"), 1, 4) + text_kv_bytes(config, 1, 4)


ONE_SESSION_HIGH_RES = _one_session_high_res()


@dataclass(frozen=True)
class TenantService:
    """App "tenants" under /tenants beside the others: a tenants file with two tenants, bravo
    with quotas (33 frames per request, no sessions); its stages' byte budget holds one 128x64
    session on the refine stage."""

    url: str
    storage: LocalStorage
    keys: dict[str, str]  # tenant -> its API key


@pytest.fixture(scope="session")
def tenants_service(service: Service, tmp_path_factory: pytest.TempPathFactory) -> TenantService:
    """Deployed on first use only (the other tests do not pay for it); the service's
    teardown stops it with the rest."""
    import json

    from services.local import server

    root = tmp_path_factory.mktemp("tenants")
    tenants_file = root / "tenants.json"
    document = {name: {"keys": [key]} for name, key in TENANT_KEYS.items()}
    document["bravo"]["quotas"] = {"max_frames": 33, "max_sessions": 0}  # test_tenancy
    document["alpha"]["quotas"] = {"max_session_seconds": 2}  # test_live_sessions
    tenants_file.write_text(json.dumps({"tenants": document}))
    settings = service.settings.model_copy(
        update={
            "storage": StorageSettings(local_dir=str(root / "store")),
            "tenants_file": str(tenants_file),
            "external_scaler": False,
            "pipeline_workers": 0,  # no HiAR step workers: two replica processes fewer to start
            "stage_budget_bytes": ONE_SESSION_HIGH_RES,
        }
    )
    server.start(settings, app_name="tenants", route_prefix="/tenants")
    return TenantService(
        url=f"{service.url}/tenants", storage=LocalStorage(root / "store"), keys=TENANT_KEYS
    )


@dataclass(frozen=True)
class ScalingService:
    """App "scaling" under /scaling: its decode pool (the stage a batch loads most on this
    machine's CPU) autoscales between 1 and 2 replicas on ongoing requests, with short delays
    (test_autoscaling)."""

    url: str
    ws_url: str


@pytest.fixture(scope="session")
def scaling_service(service: Service, tmp_path_factory: pytest.TempPathFactory) -> ScalingService:
    """Deployed on first use only; the service's teardown stops it with the rest."""
    from services.local import server

    decode = StageScaling(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1.5, num_cpus=0,
        upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=5, metrics_interval_s=0.5,
    )  # fmt: skip
    settings = service.settings.model_copy(
        update={
            "storage": StorageSettings(local_dir=str(tmp_path_factory.mktemp("scaling"))),
            "external_scaler": False,
            "pipeline_workers": 0,  # no HiAR step workers: two replica processes fewer to start
            "decode": decode,
            "batch_concurrency": 4,
            "max_running_jobs": 4,
            # Phase batching off here: with it on, the scaling test's live session failed 2 of
            # 5 runs on this 2-core machine (a stage call unanswered for 30 s, or no end);
            # 0 of 2 without. Not understood yet (issue 14's note).
            "phase_batch_size": 1,
        }
    )
    server.start(settings, app_name="scaling", route_prefix="/scaling")
    port = service.settings.http_port
    return ScalingService(f"{service.url}/scaling", f"ws://127.0.0.1:{port}/scaling/v1/sessions")
