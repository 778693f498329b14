"""Video jobs as the API sees them: submitted, read, listed, deleted, their content served."""

from __future__ import annotations

from dataclasses import dataclass

from histream_model.config import Preset
from services.errors import InvalidArgument, NotFound
from services.gateway.quotas import QuotaKeeper
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
        self,
        settings: ServeSettings,
        preset: Preset,
        records: RecordStore,
        jobs: JobRunner,
        quotas: QuotaKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.preset = preset
        self.records = records
        self.jobs = jobs
        self.quotas = quotas

    def records_of(self, tenant: str | None) -> RecordStore:
        """A tenant's records (every call names its caller's tenant; by default the
        service's own): another tenant's ids are not found there, like unknown ones."""
        return self.records.for_tenant(tenant) if tenant else self.records

    async def create(
        self, body: VideoCreate, tenant: str | None = None, video_id: str | None = None
    ) -> VideoRecord:
        s = self.settings
        generation = resolve_video(
            body, self.preset, s.served_model, s.frame_rate, s.max_prompt_chars
        )
        tenant = tenant or self.records.layout.tenant
        if self.quotas is not None:
            await self.quotas.admit_video(tenant, generation)
        return await self.jobs.submit(generation, tenant, video_id)

    async def get(self, video_id: str, tenant: str | None = None) -> VideoRecord:
        return await self.records_of(tenant).get(video_id)

    async def list(
        self, limit: int, after: str | None, order: str, tenant: str | None = None
    ) -> dict:
        if not 1 <= limit <= 100:
            raise InvalidArgument(f"limit={limit} must be in [1, 100]", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidArgument(f"order {order!r} must be 'asc' or 'desc'", param="order")
        store = self.records_of(tenant)
        ids = await store.ids()  # in creation order; only the page's records are read
        if order == "desc":
            ids.reverse()
        if after:
            if after not in ids:
                raise NotFound(f"no video with id {after!r} to list after", param="after")
            ids = ids[ids.index(after) + 1 :]
        page = await store.read(ids[:limit])
        return {
            "object": "list",
            "data": [r.public() for r in page],
            "has_more": len(ids) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    async def delete(self, video_id: str, tenant: str | None = None) -> dict:
        records = self.records_of(tenant)
        await records.get(video_id)  # 404 when unknown (or another tenant's)
        await self.jobs.cancel(video_id)
        await records.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def content(
        self, video_id: str, variant: str = "video", tenant: str | None = None
    ) -> VideoContent:
        if variant != "video":
            raise InvalidArgument(f"variant {variant!r} is not available; only 'video'", "variant")
        records = self.records_of(tenant)
        record = await records.get(video_id)
        if record.status != VideoStatus.completed:
            raise NotFound(
                f"video {video_id!r} is {record.status.value}; content exists once completed",
                param="video_id",
            )
        url = records.content_url(video_id, self.settings.storage.presign_expiry_s)
        if url is not None:
            return VideoContent(url=url, data=None)
        return VideoContent(url=None, data=await records.content(video_id))
