"""Service settings: from the environment (HISTREAM_*), a serve config, or the CLI."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from histream_model.components import DTYPES, WeightPaths, dtype_named, resolve_weights
from histream_model.config import (
    DEFAULT_PRESET,
    PRESETS,
    Preset,
    check_diagonal_steps,
    get_preset,
    with_options,
)
from services.storage import StorageSettings


class StageScaling(BaseModel):
    """Replicas and resources of one deployment (Serve autoscaling_config + actor options)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    # requests a replica works on at once; None: the deployment's default (the gateway holds a
    # request per open WebSocket or gRPC session, so its default is far higher than a stage's)
    max_ongoing_requests: int | None = Field(None, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # autoscaling only (None: Serve's defaults): how long demand must stay above (below) the
    # target before a replica is added (removed), and the window the demand is averaged over
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    look_back_period_s: float | None = Field(None, gt=0)
    metrics_interval_s: float | None = Field(None, gt=0)  # how often demand is reported

    def deployment_options(self, default_ongoing: int = 16) -> dict:
        """Serve deployment options: a fixed `num_replicas` when min and max agree (what an
        operator, or Serve's external scaling API, then changes), else an autoscaling_config."""
        options = {
            "max_ongoing_requests": self.max_ongoing_requests or default_ongoing,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        fixed = self.max_replicas <= self.min_replicas and self.initial_replicas is None
        if fixed and self.min_replicas > 0:
            return {"num_replicas": self.min_replicas, **options}
        autoscaling = {
            "min_replicas": self.min_replicas,
            "max_replicas": max(self.max_replicas, self.min_replicas),
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        for name in ("initial_replicas", "upscale_delay_s", "downscale_delay_s",
                     "look_back_period_s", "metrics_interval_s"):  # fmt: skip
            if getattr(self, name) is not None:
                autoscaling[name] = getattr(self, name)
        return {"autoscaling_config": autoscaling, **options}


class ServeSettings(BaseSettings):
    """Everything `histream serve` and the Serve application read."""

    model_config = SettingsConfigDict(env_prefix="HISTREAM_", env_nested_delimiter="__")

    preset: str = DEFAULT_PRESET  # model family and sizes; "wan2.1-1.3b" needs weights
    model_name: str | None = None  # the `model` clients ask for; default: the preset name
    weights: str | None = None  # operator weights directory (see README)
    dit: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    # the decode pool's (and generate's) streaming decoder: "wan", the VAE's own; or "taehv", a
    # tiny TAEHV-layout decoder of the same latent space from `decoder_weights` (a
    # taew2_1.safetensors/.pth; default: one in the weights directory)
    decoder: Literal["wan", "taehv"] = "wan"
    decoder_weights: str | None = None
    device: str | None = None  # default: cuda if available
    dtype: str | None = None  # float32 | bfloat16 | float16; default by device
    tenant: str = "default"  # the tenant of every caller when there is no tenants file
    # API keys -> tenants (YAML or JSON; services/gateway/tenants.py); None: an open service
    tenants_file: str | None = None
    http_host: str = "127.0.0.1"  # where the HTTP API listens (0.0.0.0: every interface)
    grpc_host: str | None = None  # where the local gRPC API listens; None: http_host
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    torch_threads: int | None = Field(None, ge=1)  # per replica; None: torch's default
    max_sessions_per_replica: int = Field(8, ge=1)  # stage admission limit (cache memory)
    # a denoising replica's bytes for sessions (KV cache + text K/V at its resolution, known
    # exactly before allocation); None: on CUDA 90% of the free memory once the model is
    # loaded, elsewhere no byte limit (max_sessions_per_replica alone)
    stage_budget_bytes: int | None = Field(None, ge=1)
    # phases of different sessions a denoising replica runs as one batched pass sequence (same
    # pass, same latent shape; results bit for bit as alone); 1: each session's phase alone
    phase_batch_size: int = Field(1, ge=1, le=64)
    phase_batch_wait_s: float = Field(0.0, ge=0, le=1)  # how long an idle replica waits for more
    max_running_jobs: int = Field(4, ge=1)  # video jobs a gateway replica drives at once
    max_queued_jobs: int = Field(256, ge=0)  # jobs waiting for a slot; past it: 429
    # a gateway replica renews its jobs' records every third of this; a queued or running job
    # whose record was not renewed for this long (its replica died, the service restarted) is
    # taken up by another replica: from its snapshot, or from the start
    job_lease_s: float = Field(30.0, gt=0)
    # a job runs at most this many times, its first run included: one interrupted more often
    # fails (error code job_interrupted)
    max_job_attempts: int = Field(3, ge=1)
    max_live_sessions: int = Field(256, ge=1)  # streaming sessions per gateway; past it: 429
    # host:port of a standalone decode server (`histream decode-server`): the pipeline decodes
    # there over gRPC instead of on the DecodePool deployment (which is then not deployed)
    decode_target: str | None = None
    decode_tls_ca: str | None = None  # PEM CA of the decode server's TLS cert; None: plaintext
    # how the gateway and the refine stage call the stages (README, *Stage transports*):
    # "handle", Serve deployment handles (one hop, Ray's object store); "grpc", each stage
    # replica serves stages.proto on a gRPC port of its own and calls go there, with deadlines,
    # health checking and status codes; which replica holds a session is Serve's choice either way
    stage_transport: Literal["handle", "grpc"] = "handle"
    stage_grpc_host: str = "0.0.0.0"  # where a stage replica's gRPC server listens (port: free)
    # TLS on the grpc transport's stage servers (PEM files every stage node can read); callers
    # check the servers' cert against stage_tls_ca, under stage_tls_server_name when the cert
    # does not name the replicas' addresses
    stage_tls_cert: str | None = None
    stage_tls_key: str | None = None
    stage_tls_ca: str | None = None
    stage_tls_server_name: str | None = None
    # a session started without num_frames streams until closed or for this long (a tenant's
    # max_session_seconds quota may cut it shorter); sliding-window modes only
    max_session_seconds: int = Field(3600, ge=1)
    # an endless session's HLS playlist lists its latest this-many segments (a live sliding
    # window); segments older than twice that are deleted from storage as new ones land
    hls_window_segments: int = Field(60, ge=1)
    retry_after_s: int = Field(5, ge=1)  # what a 429 tells the client to wait
    # stages free sessions untouched this long: a live driver touches its sessions every third
    # of it, so only a dead driver's (a lost gateway replica) are freed, within seconds
    session_idle_timeout_s: float = Field(15.0, gt=0)
    # A restore replays the anchor chunk and this many latest chunks (with sliding windows;
    # full-history modes replay every chunk): 2 is within 0.005% of an uninterrupted run.
    snapshot_window_chunks: int = Field(2, ge=0)
    # latent frames a decoder re-decodes to resume a stream (24: error < 1/255 on every preset)
    snapshot_decode_frames: int = Field(24, ge=0)
    queue_timeout_s: float = Field(600.0, gt=0)  # a job waiting for capacity fails after this
    drain_timeout_s: float = Field(30.0, gt=0)  # on shutdown, suspending sessions and jobs
    # a stage call unanswered this long is taken for lost (as if its replica died): the session's
    # state is rebuilt and the call made again. A call sent to a replica as it goes away can
    # otherwise wait forever. Well above any one call's time (a chunk's phase or decode).
    stage_call_timeout_s: float = Field(120.0, gt=0)
    # a suspended session's stages keep its caches this long: a resume within it goes on at
    # once; after it, a resume rebuilds them from the snapshot (a re-prefill)
    session_resume_grace_s: float = Field(30.0, gt=0)
    # a session whose client went away, whose gateway died or that a drain suspended may be
    # resumed by id this long after its last chunk; then it ends for good (resume: not_found)
    session_snapshot_ttl_s: float = Field(3600.0, gt=0)
    video_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # expires_at of finished videos
    max_prompt_chars: int = Field(2000, ge=1)
    max_request_bytes: int = Field(1 << 20, ge=1024)  # HTTP bodies; larger ones answer 413
    max_file_bytes: int = Field(64 << 20, ge=1024)  # an uploaded file (POST /v1/files)
    max_batch_lines: int = Field(50_000, ge=1)  # requests in one batch's input file
    # videos of one tenant's batches running at once on a gateway replica (the rest wait), so
    # that a large batch leaves the stages room for streaming sessions and single videos
    batch_concurrency: int = Field(2, ge=1)
    max_message_bytes: int = Field(64 << 10, ge=1024)  # a client's WebSocket text message
    # a WebSocket client's messages per second (bursts of as many); faster ones are refused
    max_message_rate: float = Field(20.0, gt=0)
    fps: int | None = Field(None, ge=1, le=120)  # output frame rate; None: the preset's (16)
    # mode "diagonal": denoising steps of chunk 1, 2, ..., the last kept by every later chunk
    # (strictly decreasing, each >= 1); None: the preset's (5, 4, 3, 2)
    diagonal_steps: tuple[int, ...] | None = None
    storage: StorageSettings = Field(default_factory=StorageSettings)
    gateway: StageScaling = Field(default_factory=StageScaling)
    structure: StageScaling = Field(default_factory=StageScaling)
    refine: StageScaling = Field(default_factory=StageScaling)
    decode: StageScaling = Field(default_factory=StageScaling)
    # HiAR's pipeline: sessions of the HiAR modes (hiar, histream-hiar) run on this many step
    # workers (StepStage1..N), each holding its share of the step caches, chunk i at step k
    # while chunk i + 1 runs step k - 1; 0: on the structure and refine stages like every mode
    pipeline_workers: int = Field(0, ge=0, le=4)
    step: StageScaling = Field(default_factory=StageScaling)  # each step worker's replicas
    # let an operator or an outside autoscaler set a deployment's replica count in place
    # (Ray Serve's external scaling API), besides num_replicas/autoscaling above
    external_scaler: bool = False
    # how replicas write their log files (logs/serve/): TEXT lines, or JSON objects with the
    # tenant, session_id and video_id of a log line as fields (services/logs.py)
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {sorted(PRESETS)}")
        return value

    @field_validator("diagonal_steps")
    @classmethod
    def _diagonal_steps(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None:
            check_diagonal_steps(value)
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeSettings:
        if bool(self.stage_tls_cert) != bool(self.stage_tls_key):
            given = "stage_tls_cert" if self.stage_tls_cert else "stage_tls_key"
            raise ValueError(
                f"{given} is set without its pair: give both stage_tls_cert and stage_tls_key"
            )
        return self

    @property
    def served_model(self) -> str:
        return self.model_name or self.preset

    def get_preset(self) -> Preset:
        preset = get_preset(self.preset)
        if self.diagonal_steps is not None:
            preset = with_options(preset, diagonal_steps=tuple(self.diagonal_steps))
        return preset

    @property
    def grpc_bind_host(self) -> str:
        return self.grpc_host or self.http_host

    @property
    def frame_rate(self) -> int:
        return self.fps or self.get_preset().fps

    def weight_paths(self) -> WeightPaths | None:
        if self.weights is None and self.dit is None:
            return None
        return resolve_weights(self.weights, self.dit, self.vae, self.text_encoder)

    def torch_dtype(self) -> torch.dtype | None:
        return dtype_named(self.dtype)

    def apply_threads(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
