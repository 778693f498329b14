"""Listing videos pages through ids (which sort in creation order) and reads only the records
of the page it returns, whatever the number of videos."""

from __future__ import annotations

import asyncio
import re

import pytest

from services.errors import InvalidArgument, NotFound
from services.gateway.videos import Videos
from services.jobs import RecordStore, VideoRecord, VideoStatus
from services.jobs.records import new_video_id
from services.settings import ServeSettings
from services.storage import Layout, LocalStorage


class CountingStorage(LocalStorage):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.record_reads = 0

    def get(self, key: str) -> bytes:
        self.record_reads += key.endswith("/record.json")
        return super().get(key)


def record(video_id: str, created_at: int) -> VideoRecord:
    return VideoRecord(id=video_id, model="tiny", created_at=created_at, seconds="1",
                       size="96x64", prompt="p", seed=0, mode="histream+", num_frames=21,
                       tenant="default")  # fmt: skip


def test_ids_sort_in_creation_order():
    ids = [new_video_id() for _ in range(3)]
    assert all(re.fullmatch(r"video_[0-9a-f]{32}", i) for i in ids)
    assert [i[6:18] for i in ids] == sorted(i[6:18] for i in ids)  # the milliseconds part


def test_a_page_reads_only_its_records(tmp_path):
    storage = CountingStorage(tmp_path / "store")
    records = RecordStore(storage, Layout())
    videos = Videos(ServeSettings(preset="tiny"), None, records, jobs=None)
    made = [f"video_{1700000000000 + i:012x}{'0' * 20}" for i in range(40)]

    async def go():
        for i, video_id in enumerate(made):
            await records.put(record(video_id, 1700000000 + i))
        storage.record_reads = 0
        first = await videos.list(5, None, "desc")
        reads_first = storage.record_reads
        second = await videos.list(5, first["last_id"], "desc")
        oldest = await videos.list(3, None, "asc")
        with pytest.raises(NotFound):
            await videos.list(5, "video_nope", "desc")
        return first, reads_first, second, oldest

    first, reads_first, second, oldest = asyncio.run(go())
    assert [v["id"] for v in first["data"]] == made[::-1][:5] and first["has_more"]
    assert reads_first == 5  # not 40
    assert [v["id"] for v in second["data"]] == made[::-1][5:10]
    assert [v["id"] for v in oldest["data"]] == made[:3]
    assert (first["first_id"], first["last_id"]) == (made[-1], made[-5])


def test_the_last_page_says_no_more_and_bad_pages_are_named(tmp_path):
    records = RecordStore(LocalStorage(tmp_path / "store"), Layout())
    videos = Videos(ServeSettings(preset="tiny"), None, records, jobs=None)
    made = [f"video_{1700000000000 + i:012x}{'0' * 20}" for i in range(5)]

    async def go():
        for i, video_id in enumerate(made):
            await records.put(record(video_id, 1700000000 + i))
        pages, after = [], None
        while True:
            page = await videos.list(2, after, "asc")
            pages.append(page)
            if not page["has_more"]:
                return pages
            after = page["last_id"]

    pages = asyncio.run(go())
    assert [[v["id"] for v in p["data"]] for p in pages] == [made[:2], made[2:4], made[4:]]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert (pages[-1]["first_id"], pages[-1]["last_id"]) == (made[4], made[4])
    for limit, order, words in ((0, "asc", "limit=0 must be in [1, 100]"),
                                (101, "asc", "limit=101"), (5, "up", "order 'up'")):  # fmt: skip
        with pytest.raises(InvalidArgument, match=re.escape(words)):
            asyncio.run(videos.list(limit, None, order))


@pytest.mark.parametrize(
    "status", [VideoStatus.queued, VideoStatus.in_progress, VideoStatus.failed]
)
def test_content_before_completion_is_not_found_and_says_why(tmp_path, status):
    records = RecordStore(LocalStorage(tmp_path / "store"), Layout())
    videos = Videos(ServeSettings(preset="tiny"), None, records, jobs=None)
    video_id = f"video_{1700000000000:012x}{'0' * 20}"
    asyncio.run(records.put(record(video_id, 1700000000).model_copy(update={"status": status})))
    with pytest.raises(NotFound, match=f"is {status.value}; content exists once completed"):
        asyncio.run(videos.content(video_id))
    with pytest.raises(InvalidArgument, match="variant 'thumbnail' is not available"):
        asyncio.run(videos.content(video_id, variant="thumbnail"))
