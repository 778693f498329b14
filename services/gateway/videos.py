"""Video jobs as the API sees them: submitted, read, listed, deleted, their content served."""

from __future__ import annotations

from dataclasses import dataclass

from histream_model.config import Preset
from services.errors import InvalidArgument, NotFound
from services.gateway.requests import VideoCreate, resolve_video
from services.jobs import JobRunner, RecordStore, VideoRecord, VideoStatus
from services.settings import ServeSettings


@dataclass(frozen=True)
class VideoContent:
    """Where a finished video's MP4 is: a presigned URL to redirect to, or its bytes."""

    url: str | None
    data: bytes | None


class Videos:
    def __init__(
        self, settings: ServeSettings, preset: Preset, records: RecordStore, jobs: JobRunner
    ) -> None:
        self.settings = settings
        self.preset = preset
        self.records = records
        self.jobs = jobs

    async def create(self, body: VideoCreate) -> VideoRecord:
        s = self.settings
        generation = resolve_video(
            body, self.preset, s.served_model, s.frame_rate, s.max_prompt_chars
        )
        return await self.jobs.submit(generation)

    async def get(self, video_id: str) -> VideoRecord:
        return await self.records.get(video_id)

    async def list(self, limit: int, after: str | None, order: str) -> dict:
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

    async def delete(self, video_id: str) -> dict:
        await self.records.get(video_id)  # 404 when unknown
        await self.jobs.cancel(video_id)
        await self.records.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def content(self, video_id: str, variant: str = "video") -> VideoContent:
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
