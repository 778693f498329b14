"""Video jobs: their records (in storage, readable by any gateway replica) and their runner.

Lifecycle: queued (accepted, waiting for a job slot and stage capacity) -> in_progress (with
progress per chunk) -> completed (MP4 and manifest stored) | failed (error code + message).
Deleting a job cancels it if it is running and removes every object under its prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid

from pydantic import BaseModel

from histream_model.config import Preset
from services.api import Resolved
from services.errors import NotFound, ServiceError
from services.metrics import Metrics
from services.pipeline import SessionDriver, SessionPlan, StageHandles, shape_for
from services.publish import Layout, delete_video
from services.storage import ObjectNotFound, Storage

log = logging.getLogger("histream.jobs")


class VideoStatus(enum.StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"


class VideoError(BaseModel):
    code: str
    message: str


class VideoRecord(BaseModel):
    """A job as stored (`record.json`) and, minus `tenant`, as returned (OpenAI video object)."""

    id: str
    object: str = "video"
    model: str
    status: VideoStatus = VideoStatus.queued
    progress: int = 0
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    error: VideoError | None = None
    seconds: str
    size: str
    prompt: str
    seed: int
    mode: str
    num_frames: int
    tenant: str

    def public(self) -> dict:
        return self.model_dump(mode="json", exclude={"tenant"})


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class RecordStore:
    """Job records under the tenant's prefix; blocking storage calls run in threads."""

    def __init__(self, storage: Storage, layout: Layout) -> None:
        self.storage = storage
        self.layout = layout

    async def put(self, record: VideoRecord) -> None:
        data = record.model_dump_json().encode()
        key = self.layout.video_record_key(record.id)
        await asyncio.to_thread(self.storage.put, key, data, "application/json")

    async def get(self, video_id: str) -> VideoRecord:
        try:
            key = self.layout.video_record_key(video_id)
            data = await asyncio.to_thread(self.storage.get, key)
        except (ObjectNotFound, ValueError):
            raise NotFound(f"no video with id {video_id!r}", param="video_id") from None
        return VideoRecord.model_validate_json(data)

    async def exists(self, video_id: str) -> bool:
        return await asyncio.to_thread(self.storage.exists, self.layout.video_record_key(video_id))

    async def list(self) -> list[VideoRecord]:
        keys = await asyncio.to_thread(self.storage.list, self.layout.videos_prefix())
        records = []
        for key in keys:
            if key.endswith("/record.json"):
                with contextlib.suppress(ObjectNotFound):
                    data = await asyncio.to_thread(self.storage.get, key)
                    records.append(VideoRecord.model_validate_json(data))
        return records

    async def delete(self, video_id: str) -> int:
        return await asyncio.to_thread(delete_video, self.storage, self.layout, video_id)

    async def content(self, video_id: str) -> bytes:
        key = self.layout.video_key(video_id)
        try:
            return await asyncio.to_thread(self.storage.get, key)
        except ObjectNotFound:
            raise NotFound(f"video {video_id!r} has no content yet", param="video_id") from None

    def content_url(self, video_id: str, expires_s: int) -> str | None:
        return self.storage.presigned_url(self.layout.video_key(video_id), expires_s)


class JobDeleted(Exception):
    """The job's record was deleted (by another gateway replica) while it ran."""


class JobRunner:
    """Runs this gateway replica's video jobs, at most `max_running` at a time."""

    def __init__(
        self,
        handles: StageHandles,
        records: RecordStore,
        preset: Preset,
        metrics: Metrics,
        max_running: int,
        queue_timeout_s: float,
        ttl_s: int,
        fps: int,
    ) -> None:
        self.handles = handles
        self.records = records
        self.preset = preset
        self.metrics = metrics
        self.slots = asyncio.Semaphore(max_running)
        self.queue_timeout_s = queue_timeout_s
        self.ttl_s = ttl_s
        self.fps = fps
        self.tasks: dict[str, asyncio.Task] = {}

    async def submit(self, resolved: Resolved) -> VideoRecord:
        shape = shape_for(
            self.preset, resolved.mode, resolved.height, resolved.width, resolved.num_frames
        )
        record = VideoRecord(
            id=new_video_id(),
            model=resolved.model,
            created_at=int(time.time()),
            seconds=resolved.seconds,
            size=f"{resolved.width}x{resolved.height}",
            prompt=resolved.prompt,
            seed=resolved.seed,
            mode=resolved.mode,
            num_frames=resolved.num_frames,
            tenant=self.records.layout.tenant,
        )
        await self.records.put(record)
        plan = SessionPlan(
            object_id=record.id,
            kind="video",
            tenant=record.tenant,
            shape=shape,
            seed=record.seed,
            prompt=record.prompt,
            fps=self.fps,
        )
        task = asyncio.create_task(self._run(record, plan))
        self.tasks[record.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(record.id, None))
        return record

    async def _update(self, record: VideoRecord) -> None:
        if not await self.records.exists(record.id):
            raise JobDeleted(record.id)
        await self.records.put(record)

    async def _run(self, record: VideoRecord, plan: SessionPlan) -> None:
        driver = SessionDriver(self.handles, plan)
        try:
            async with self.slots:
                with self.metrics.track("video", driver):
                    await self._generate(record, plan, driver)
            now = int(time.time())
            record.status, record.progress = VideoStatus.completed, 100
            record.completed_at, record.expires_at = now, now + self.ttl_s
            await self._update(record)
            self.metrics.videos.labels(status="completed").inc()
        except asyncio.CancelledError:
            log.info("video %s cancelled", record.id)
            raise
        except JobDeleted:
            log.info("video %s was deleted while running; stopped", record.id)
        except Exception as err:
            code, message = _error_of(err)
            log.warning("video %s failed: %s %s", record.id, code, message)
            record.status = VideoStatus.failed
            record.error = VideoError(code=code, message=message)
            with contextlib.suppress(Exception):
                await self._update(record)
            self.metrics.videos.labels(status="failed").inc()
        finally:
            await driver.close()

    async def _generate(
        self, record: VideoRecord, plan: SessionPlan, driver: SessionDriver
    ) -> None:
        """Open the session (waiting for capacity), generate every chunk, publish the MP4."""
        await driver.open(deadline_s=self.queue_timeout_s)
        record.status = VideoStatus.in_progress
        await self._update(record)
        total = plan.shape.num_chunks
        async for chunk in driver.chunks():
            self.metrics.observe_chunk(chunk)
            record.progress = min(99, int(100 * (chunk.index + 1) / total))
            await self._update(record)
        if not await self.records.exists(record.id):
            raise JobDeleted(record.id)
        await driver.finish(
            {
                "id": record.id,
                "model": record.model,
                "mode": record.mode,
                "seed": record.seed,
                "size": record.size,
                "fps": plan.fps,
                "created_at": record.created_at,
            }
        )

    async def cancel(self, video_id: str) -> bool:
        """Cancel a job running on this replica; True if one was."""
        task = self.tasks.get(video_id)
        if task is None:
            return False
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return True


def _error_of(err: BaseException) -> tuple[str, str]:
    if isinstance(err, ServiceError):
        return err.code, err.message
    return "internal_error", f"{type(err).__name__}: {err}"
