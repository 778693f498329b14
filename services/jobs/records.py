"""Video job records: stored under the tenant's prefix, readable by any gateway replica.

Lifecycle: queued (accepted, waiting for a job slot and stage capacity) -> in_progress (with
progress per chunk) -> completed (MP4 and manifest stored) | failed (error code + message);
`advance` refuses any other move.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from services.errors import NotFound, Unavailable
from services.jobs.marks import Marks
from services.protocol import Lifecycle
from services.storage import (
    Layout,
    ObjectNotFound,
    Storage,
    delete_video,
    is_deleted,
    sweep_tombstones,
)

log = logging.getLogger("histream.jobs")
T = TypeVar("T")


class VideoStatus(enum.StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"


VIDEO_TRANSITIONS: dict[VideoStatus, frozenset[VideoStatus]] = {
    VideoStatus.queued: frozenset({VideoStatus.in_progress, VideoStatus.failed}),
    VideoStatus.in_progress: frozenset({VideoStatus.completed, VideoStatus.failed}),
    VideoStatus.completed: frozenset(),
    VideoStatus.failed: frozenset(),
}


UNFINISHED = (VideoStatus.queued, VideoStatus.in_progress)


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
    # the gateway replica running the job and until when its lease holds (unix seconds); a
    # queued or in_progress job whose lease ran out is taken up by another (services.jobs.leases)
    owner: str = ""
    lease_until: int = 0
    attempts: int = 1  # runs started, the first included

    def public(self) -> dict:
        return self.model_dump(mode="json", exclude=PRIVATE)

    def advance(self, status: VideoStatus) -> None:
        """Move to `status`; IllegalTransition if the lifecycle does not allow it."""
        Lifecycle(self.status, VIDEO_TRANSITIONS, f"video {self.id}").to(status)
        self.status = status


PRIVATE = {"tenant", "owner", "lease_until", "attempts"}  # kept in storage, never returned


def new_video_id() -> str:
    """`video_`, the creation time in milliseconds (12 hex digits), then 20 random hex digits:
    ids sort in creation order, so a listing reads only the records of its page."""
    return f"video_{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


class RecordStore:
    """Job records under the tenant's prefix; blocking storage calls run in threads. Storage
    that does not answer is `Unavailable` (503) to the client, the details in the log."""

    def __init__(self, storage: Storage, layout: Layout) -> None:
        self.storage = storage
        self.layout = layout
        self._tenants: dict[str, RecordStore] = {layout.tenant: self}
        self.marks = Marks(storage, layout.unfinished_prefix("videos"), self.storage_call)
        # the tenant's unfinished batches' (services.jobs.batches.BatchStore)
        self.batch_marks = Marks(storage, layout.unfinished_prefix("batches"), self.storage_call)

    def for_tenant(self, tenant: str) -> RecordStore:
        """The records of `tenant`, in the same storage: one store per tenant, whichever
        tenant's store is asked (each keeps what it learned, e.g. that its marks are complete)."""
        store = self._tenants.get(tenant)
        if store is None:
            store = self._tenants[tenant] = RecordStore(self.storage, Layout(tenant))
            store._tenants = self._tenants
        return store

    async def storage_call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except (ObjectNotFound, ValueError):
            raise
        except Exception as err:
            error_id = f"err_{uuid.uuid4().hex[:16]}"
            log.error("storage call %s failed (%s)", fn.__name__, error_id, exc_info=err)
            raise Unavailable(
                f"storage is unavailable; retry later (quote {error_id} when reporting it)"
            ) from None

    async def put(self, record: VideoRecord) -> None:
        """Store the record: a queued job is marked unfinished first, a finished one unmarked
        once its record says so (services.jobs.marks)."""
        data = record.model_dump_json().encode()
        key = self.layout.video_record_key(record.id)
        if record.status == VideoStatus.queued:
            await self.marks.mark(record.id)
        await self.storage_call(self.storage.put, key, data, "application/json")
        if record.status not in UNFINISHED:
            await self.marks.unmark(record.id)

    async def unfinished(self) -> list[VideoRecord]:
        """The tenant's queued and running jobs, found by their marks: no finished video's
        record is read (but the first call in a process reads them all once)."""
        return await self.marks.search(
            self.get, lambda r: r.status in UNFINISHED, self.list, lambda r: r.id
        )

    async def get(self, video_id: str) -> VideoRecord:
        try:
            key = self.layout.video_record_key(video_id)
            data = await self.storage_call(self.storage.get, key)
        except (ObjectNotFound, ValueError):
            raise NotFound(f"no video with id {video_id!r}", param="video_id") from None
        return VideoRecord.model_validate_json(data)

    async def exists(self, video_id: str) -> bool:
        return await self.storage_call(self.storage.exists, self.layout.video_record_key(video_id))

    async def ids(self) -> list[str]:
        """The ids of the tenant's videos, sorted (creation order: see new_video_id); reads
        no record."""
        keys = await self.storage_call(self.storage.list, self.layout.videos_prefix())
        return sorted(k.rsplit("/", 2)[-2] for k in keys if k.endswith("/record.json"))

    async def read(self, video_ids: list[str]) -> list[VideoRecord]:
        """The records of `video_ids`, in that order (those deleted meanwhile left out)."""
        records = []
        for video_id in video_ids:
            with contextlib.suppress(NotFound):
                records.append(await self.get(video_id))
        return records

    async def list(self) -> list[VideoRecord]:
        keys = await self.storage_call(self.storage.list, self.layout.videos_prefix())
        records = []
        for key in keys:
            if key.endswith("/record.json"):
                with contextlib.suppress(ObjectNotFound):
                    data = await self.storage_call(self.storage.get, key)
                    records.append(VideoRecord.model_validate_json(data))
        return records

    async def put_unless_deleted(self, record: VideoRecord) -> bool:
        """Store `record` unless its video was deleted: then False, and its objects (this write
        included) are deleted again. Written first, checked after: a delete whose tombstone the
        check misses deletes the record after this write (see `delete_video`)."""
        await self.put(record)
        if not await self.storage_call(is_deleted, self.storage, self.layout, record.id):
            return True
        await self.delete(record.id)
        return False

    async def delete(self, video_id: str) -> int:
        return await self.storage_call(delete_video, self.storage, self.layout, video_id)

    async def sweep_tombstones(self, older_than_s: float) -> int:
        return await self.storage_call(sweep_tombstones, self.storage, self.layout, older_than_s)

    async def content(self, video_id: str) -> bytes:
        key = self.layout.video_key(video_id)
        try:
            return await self.storage_call(self.storage.get, key)
        except ObjectNotFound:
            raise NotFound(f"video {video_id!r} has no content yet", param="video_id") from None

    async def reachable(self) -> None:
        """Raises when storage does not answer (readiness)."""
        await asyncio.to_thread(self.storage.exists, self.layout.video_record_key("ready-probe"))

    def content_url(self, video_id: str, expires_s: int) -> str | None:
        return self.storage.presigned_url(self.layout.video_key(video_id), expires_s)
