"""What the gateway does, whatever the transport: validate requests, run video jobs and
streaming sessions, answer for stored videos. The HTTP, WebSocket and gRPC adapters translate to
and from these calls; errors are `ServiceError`s, which each adapter maps to its own codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from services.errors import InvalidArgument, NotFound, QueueFull, Unavailable, remote_result
from services.gateway.metrics import Metrics
from services.gateway.requests import (
    SessionStart,
    VideoCreate,
    check_prompt_field,
    model_ids,
    resolve_session,
    resolve_video,
)
from services.jobs import JobRunner, RecordStore, VideoRecord, VideoStatus
from services.protocol import ChunkReady, EndReason, SessionEvent, StageName, StreamKind
from services.sessions import (
    Durability,
    LiveSession,
    SessionDriver,
    SessionPlan,
    SessionRegistry,
    SnapshotStore,
    StageHandles,
)
from services.settings import ServeSettings
from services.storage import Layout, open_storage

log = logging.getLogger("histream.gateway")


READY_TIMEOUT_S = 2.0  # a dependency slower than this to answer a probe is not ready
STAGES = (StageName.STRUCTURE, StageName.REFINE, StageName.DECODE)


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class VideoContent:
    """Where a finished video's MP4 is: a presigned URL to redirect to, or its bytes."""

    url: str | None
    data: bytes | None


class GatewayCore:
    """One gateway replica's state and operations: no model, no transport."""

    def __init__(self, settings: ServeSettings, handles: StageHandles) -> None:
        self.settings = settings
        self.preset = settings.get_preset()
        self.started_at = int(time.time())
        self.layout = Layout(settings.tenant)
        self.storage = open_storage(settings.storage)
        self.records = RecordStore(self.storage, self.layout)
        self.handles = handles
        self.metrics = Metrics()
        self.durability = Durability(
            window_chunks=settings.snapshot_window_chunks,
            decode_frames=settings.snapshot_decode_frames,
            store=SnapshotStore(self.storage, self.layout),
        )
        self.jobs = JobRunner(
            handles, self.records, settings, observer=self.metrics, durability=self.durability
        )
        self.sessions = SessionRegistry()
        self.draining = False

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
            }
            for name in model_ids(served)
        ]

    def model(self, model_id: str) -> dict:
        for entry in self.models():
            if entry["id"] == model_id:
                return entry
        raise NotFound(f"no model with id {model_id!r}; see GET /v1/models", param="model")

    # -- video jobs -------------------------------------------------------------------------------

    async def create_video(self, body: VideoCreate) -> VideoRecord:
        s = self.settings
        generation = resolve_video(
            body, self.preset, s.served_model, s.frame_rate, s.max_prompt_chars
        )
        return await self.jobs.submit(generation)

    async def get_video(self, video_id: str) -> VideoRecord:
        return await self.records.get(video_id)

    async def list_videos(self, limit: int, after: str | None, order: str) -> dict:
        if not 1 <= limit <= 100:
            raise InvalidArgument(f"limit={limit} must be in [1, 100]", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidArgument(f"order {order!r} must be 'asc' or 'desc'", param="order")
        records = sorted(await self.records.list(), key=lambda r: (r.created_at, r.id))
        if order == "desc":
            records.reverse()
        if after:
            ids = [r.id for r in records]
            if after not in ids:
                raise NotFound(f"no video with id {after!r} to list after", param="after")
            records = records[ids.index(after) + 1 :]
        page = records[:limit]
        return {
            "object": "list",
            "data": [r.public() for r in page],
            "has_more": len(records) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    async def delete_video(self, video_id: str) -> dict:
        await self.records.get(video_id)  # 404 when unknown
        await self.jobs.cancel(video_id)
        await self.records.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def video_content(self, video_id: str, variant: str = "video") -> VideoContent:
        if variant != "video":
            raise InvalidArgument(f"variant {variant!r} is not available; only 'video'", "variant")
        record = await self.records.get(video_id)
        if record.status != VideoStatus.completed:
            raise NotFound(
                f"video {video_id!r} is {record.status.value}; content exists once completed",
                param="video_id",
            )
        url = self.records.content_url(video_id, self.settings.storage.presign_expiry_s)
        if url is not None:
            return VideoContent(url=url, data=None)
        return VideoContent(url=None, data=await self.records.content(video_id))

    # -- streaming sessions -----------------------------------------------------------------------

    def open_session(self, body: SessionStart) -> LiveSession:
        """Validate a session request (nothing reaches a stage on bad input) and register it."""
        s = self.settings
        if self.draining:
            raise Unavailable("this gateway replica is shutting down; start the session again")
        if len(self.sessions) >= s.max_live_sessions:
            raise QueueFull(
                f"this gateway replica has {len(self.sessions)} open sessions, its limit "
                f"(max_live_sessions={s.max_live_sessions}); retry after {s.retry_after_s} s",
                retry_after_s=s.retry_after_s,
            )
        generation = resolve_session(
            body, self.preset, s.served_model, s.frame_rate, s.max_prompt_chars
        )
        session_id = new_session_id()
        plan = SessionPlan.of(
            generation, session_id, StreamKind.SESSION, self.layout.tenant, s.frame_rate
        )
        live = LiveSession(
            session_id,
            SessionDriver(self.handles, plan, self.durability, self.metrics.restored),
            playlist_key=self.layout.session_playlist_key(session_id),
        )
        self.sessions.add(live)
        return live

    async def session_events(self, live: LiveSession) -> AsyncIterator[SessionEvent]:
        """The session's events until it ends; it is counted as active meanwhile."""
        try:
            with self.metrics.track(StreamKind.SESSION, live.driver):
                events = live.events(self.settings.queue_timeout_s)
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, ChunkReady):
                            self.metrics.chunk(event)
                        yield event
        finally:
            self.sessions.remove(live.id)

    def session(self, session_id: str, token: str | None) -> LiveSession:
        """A live session, for a client quoting its token (prompt updates, closes by id)."""
        return self.sessions.get(session_id, token)

    async def update_prompt(self, live: LiveSession, prompt: object) -> tuple[int, int]:
        text = check_prompt_field(prompt, self.settings.max_prompt_chars)
        return await live.driver.update_prompt(text)

    async def drain(self, timeout_s: float) -> dict[str, int]:
        """Shutting down: admit nothing more; suspend every session and job where it stands
        (snapshots kept: sessions resume by id, jobs go on after a restart), within
        `timeout_s`. Returns how many of each were suspended."""
        self.draining = True
        live = self.sessions.all()
        for session in live:
            session.request_stop(EndReason.DRAINING)
        jobs = asyncio.ensure_future(self.jobs.drain())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sessions.emptied(), timeout_s)
        try:
            suspended_jobs = await asyncio.wait_for(jobs, timeout_s)
        except TimeoutError:
            suspended_jobs = len(self.jobs.tasks)
        log.info("drained: %d sessions, %d jobs suspended", len(live), suspended_jobs)
        return {"sessions": len(live), "jobs": suspended_jobs}

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

    def active_sessions(self) -> dict[str, int]:
        return {str(kind): self.metrics.active(kind) for kind in StreamKind}
