"""What the gateway does, whatever the transport: validate requests, run video jobs and
streaming sessions, answer for stored videos. The HTTP, WebSocket and gRPC adapters translate to
and from these calls; errors are `ServiceError`s, which each adapter maps to its own codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from histream_model.config import MODES
from services.errors import NotFound, remote_result
from services.gateway.batches import Batches
from services.gateway.metrics import Metrics
from services.gateway.quotas import QuotaKeeper
from services.gateway.requests import VideoCreate, model_ids
from services.gateway.streams import Streams
from services.gateway.videos import Videos
from services.jobs import JobRunner, RecordStore
from services.jobs.batches import BatchRunner
from services.jobs.files import FileStore
from services.protocol import StageName, StreamKind
from services.sessions import Durability, SnapshotStore, StageHandles
from services.settings import ServeSettings
from services.storage import Layout, open_storage
from services.tenants import Tenancy

log = logging.getLogger("histream.gateway")


READY_TIMEOUT_S = 2.0  # a dependency slower than this to answer a probe is not ready
STAGES = (StageName.STRUCTURE, StageName.REFINE, StageName.DECODE)


class GatewayCore:
    """One gateway replica's state and operations: no model, no transport."""

    def __init__(self, settings: ServeSettings, handles: StageHandles, mailbox=None) -> None:
        self.settings = settings
        self.preset = settings.get_preset()
        self.started_at = int(time.time())
        self.layout = Layout(settings.tenant)
        self.tenancy = Tenancy(settings.tenants_file, settings.tenant)
        self.storage = open_storage(settings.storage)
        self.records = RecordStore(self.storage, self.layout)
        self.handles = handles
        self.metrics = Metrics()
        self.durability = Durability(
            window_chunks=settings.snapshot_window_chunks,
            decode_frames=settings.snapshot_decode_frames,
            store=SnapshotStore(self.storage, self.layout),
            resume_grace_s=settings.session_resume_grace_s,
            snapshot_ttl_s=settings.session_snapshot_ttl_s,
            heartbeat_s=settings.session_idle_timeout_s / 3,
            settle_s=settings.drain_timeout_s,
            replay_chunks=settings.hls_window_segments,
        )
        self.jobs = JobRunner(
            handles,
            self.records,
            settings,
            observer=self.metrics,
            durability=self.durability,
            tenants=self.tenancy.names,
        )
        self.quotas = QuotaKeeper(
            self.tenancy,
            self.records,
            open_sessions=lambda tenant: self.streams.open_count(tenant),
            retry_after_s=settings.retry_after_s,
        )
        self.videos = Videos(settings, self.preset, self.records, self.jobs, self.quotas)
        files = FileStore(self.records)
        self.batch_runner = BatchRunner(
            lambda body, tenant, video_id: self.videos.create(
                VideoCreate.parse(body), tenant, video_id
            ),
            self.records,
            files,
            lease_s=settings.job_lease_s,
            concurrency=settings.batch_concurrency,
            tenants=self.tenancy.names,
        )
        self.batches = Batches(settings, files, self.batch_runner, self.quotas)
        self.streams = Streams(
            settings,
            self.preset,
            handles,
            self.durability,
            self.storage,
            self.metrics,
            tenants=self.tenancy.names,
            quotas=self.quotas,
            mailbox=mailbox,
        )

    def start_background(self) -> None:
        """Start, once, what this replica does besides answering requests: renewing its jobs'
        leases and taking up jobs whose replica is gone; ending sessions nobody resumed;
        answering control calls for its sessions that other replicas received. Called
        from Serve's health check (within seconds of the replica's start) and on requests."""
        if not self.draining:
            self.jobs.adopter.start()
            self.streams.sweeper.start()
            self.streams.control.start()
            self.batch_runner.start()

    def caller(self, authorization: str | None) -> str:
        """The tenant of a call carrying `authorization` (401 without a valid key), charged
        one request of its requests_per_minute quota. Every API call starts here."""
        tenant = self.tenancy.authenticate(authorization)
        self.quotas.admit_request(tenant)
        return tenant

    # -- models -----------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        """The OpenAI model objects a request's `model` may name."""
        served = self.settings.served_model
        return [
            {
                "id": name,
                "object": "model",
                "created": self.started_at,
                "owned_by": "histream",
                "preset": self.preset.name,
                "mode": None if name == served else name,
                "description": self.preset.description if name == served else MODES[name].summary,
            }
            for name in model_ids(served)
        ]

    def model(self, model_id: str) -> dict:
        for entry in self.models():
            if entry["id"] == model_id:
                return entry
        raise NotFound(f"no model with id {model_id!r}; see GET /v1/models", param="model")

    async def drain(self, timeout_s: float) -> dict[str, int]:
        """Shutting down: admit nothing more; suspend every session and job where it stands
        (snapshots kept: sessions resume by id, jobs go on after a restart), within
        `timeout_s`. Returns how many of each were suspended."""
        await self.batch_runner.drain()
        jobs = asyncio.ensure_future(self.jobs.drain())
        sessions = await self.streams.drain(timeout_s)
        try:
            suspended_jobs = await asyncio.wait_for(jobs, timeout_s)
        except TimeoutError:
            suspended_jobs = len(self.jobs.tasks)
        log.info("drained: %d sessions, %d jobs suspended", sessions, suspended_jobs)
        return {"sessions": sessions, "jobs": suspended_jobs}

    @property
    def draining(self) -> bool:
        return self.streams.draining

    # -- health, for tests and benchmarks ---------------------------------------------------------

    def health(self) -> dict:
        """Liveness: this replica answers (it never waits on anything)."""
        return {"status": "ok", "model": self.settings.served_model, "preset": self.preset.name}

    async def readiness(self) -> tuple[bool, dict]:
        """Readiness: storage and every stage answer within READY_TIMEOUT_S."""
        probes = {
            "storage": self.records.reachable(),
            **{str(n): remote_result(self.handles[n].stats.remote()) for n in STAGES},
        }

        async def probe(work: Awaitable) -> str:
            try:
                await asyncio.wait_for(work, READY_TIMEOUT_S)
            except Exception as err:
                return f"failed ({type(err).__name__})"
            return "ok"

        results = await asyncio.gather(*map(probe, probes.values()))
        checks = dict(zip(probes, results, strict=True))
        ready = all(result == "ok" for result in results)
        return ready, {"status": "ready" if ready else "not_ready", "checks": checks}

    async def scrape_stages(self) -> None:
        """Each stage's bytes held and budget into /metrics (one replica each, at most
        READY_TIMEOUT_S; a stage that does not answer is left out)."""

        async def stats(name: StageName) -> dict | None:
            try:
                work = remote_result(self.handles[name].stats.remote())
                return await asyncio.wait_for(work, READY_TIMEOUT_S)
            except Exception:
                return None

        answers = await asyncio.gather(*(stats(n) for n in STAGES))
        self.metrics.stage_stats(
            {str(n): a for n, a in zip(STAGES, answers, strict=True) if a is not None}
        )

    def active_sessions(self) -> dict[str, int]:
        return {str(kind): self.metrics.active(kind) for kind in StreamKind}
