"""Unfinished marks (services.jobs.marks): the job sweep and the max_videos quota find queued
and running video jobs, and the batch sweep unfinished batches, without reading a finished
one's record."""

from __future__ import annotations

import json
import time
from collections import Counter

from services.jobs import RecordStore, VideoRecord, VideoStatus
from services.jobs import marks as marks_module
from services.storage import Layout, LocalStorage, delete_video
from tests.services.harness import run


class Counting(LocalStorage):
    """Local storage counting the records it reads."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    def get(self, key: str) -> bytes:
        self.reads[key.rsplit("/", 2)[-2] if key.endswith("/record.json") else key] += 1
        return super().get(key)


def record(video_id: str, status: VideoStatus = VideoStatus.queued) -> VideoRecord:
    return VideoRecord(
        id=video_id, model="tiny", created_at=1, seconds="1", size="96x64", prompt="p", seed=0,
        mode="histream+", num_frames=21, tenant="default", status=status,
    )  # fmt: skip


def marks(storage) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in storage.list(Layout().unfinished_prefix())]


def test_a_job_is_marked_while_unfinished_and_found_without_reading_finished_records(tmp_path):
    storage = Counting(tmp_path)
    records = RecordStore(storage, Layout())

    async def go():
        for name in ("done", "failed", "running", "waiting"):
            await records.put(record(name))  # every job starts queued: marked
        assert marks(storage) == ["done", "failed", "running", "waiting"]
        for name, status in [("done", VideoStatus.completed), ("failed", VideoStatus.failed),
                             ("running", VideoStatus.in_progress)]:  # fmt: skip
            await records.put(record(name, status))
        assert marks(storage) == ["running", "waiting"]  # finished ones are unmarked
        await records.unfinished()  # the first call checks every record once (see below)
        storage.reads.clear()
        return await records.unfinished()

    found = run(go())
    assert sorted(r.id for r in found) == ["running", "waiting"]
    assert set(storage.reads) == {"running", "waiting"}  # no finished record was read


def test_records_kept_before_marks_are_marked_by_the_first_search(tmp_path):
    storage = Counting(tmp_path)
    old = RecordStore(storage, Layout())

    async def go():
        for name, status in [("a", VideoStatus.in_progress), ("b", VideoStatus.completed)]:
            await old.put(record(name, status))  # never queued here: no mark
        assert marks(storage) == []
        fresh = RecordStore(storage, Layout())  # a replica started over those records
        found = [r.id for r in await fresh.unfinished()]
        storage.reads.clear()
        again = [r.id for r in await fresh.unfinished()]
        return found, again

    found, again = run(go())
    assert found == again == ["a"] and marks(storage) == ["a"]
    assert "b" not in storage.reads  # only the first search read every record


def test_marks_left_behind_are_removed_and_a_fresh_one_without_its_record_is_kept(tmp_path):
    storage = Counting(tmp_path)
    records = RecordStore(storage, Layout())
    records.marks.complete = True
    layout = Layout()

    def mark(video_id: str, age_s: float) -> None:
        stamp = json.dumps({"marked_at": time.time() - age_s}).encode()
        storage.put(layout.unfinished_key(video_id), stamp)

    async def go():
        await records.put(record("finished", VideoStatus.completed))
        mark("finished", 0)  # its replica stopped before unmarking it
        mark("being-created", 1)  # its record is being written right now
        mark("never-stored", marks_module.ORPHAN_MARK_S + 1)
        storage.put(layout.unfinished_key("garbled"), b"?")
        return await records.unfinished()

    assert run(go()) == []
    assert marks(storage) == ["being-created"]


def test_a_delete_removes_the_mark(tmp_path):
    storage = LocalStorage(tmp_path)
    records = RecordStore(storage, Layout())
    run(records.put(record("gone")))
    assert marks(storage) == ["gone"]
    delete_video(storage, Layout(), "gone")
    assert marks(storage) == [] and run(records.unfinished()) == []


def test_batches_are_marked_until_they_end_and_found_by_their_marks(tmp_path):
    from services.jobs.batches import BatchRecord, BatchStatus, BatchStore

    storage = Counting(tmp_path)
    store = BatchStore(RecordStore(storage, Layout()))
    prefix = Layout().unfinished_prefix("batches")

    def batch(batch_id: str, status: BatchStatus = BatchStatus.validating) -> BatchRecord:
        return BatchRecord(
            id=batch_id, endpoint="/v1/videos", input_file_id="file-1", completion_window="24h",
            created_at=1, tenant="default", status=status,
        )  # fmt: skip

    async def go():
        for name in ("done", "cancelled", "running"):
            await store.put(batch(name))
        for name, status in [("done", BatchStatus.completed),
                             ("cancelled", BatchStatus.cancelled),
                             ("running", BatchStatus.in_progress)]:  # fmt: skip
            await store.put(batch(name, status))
        assert [k.rsplit("/", 1)[1] for k in storage.list(prefix)] == ["running"]
        await store.unfinished()
        storage.reads.clear()
        return await store.unfinished()

    assert [b.id for b in run(go())] == ["running"]
    assert set(storage.reads) == {"running"}  # no ended batch was read


def test_every_tenant_has_one_store_so_its_first_search_is_done_once(tmp_path):
    storage = Counting(tmp_path)
    root = RecordStore(storage, Layout())
    acme = root.for_tenant("acme")
    assert acme.for_tenant("default") is root and acme.for_tenant("acme") is acme
    assert root.for_tenant("beta") is acme.for_tenant("beta")
    run(root.for_tenant("beta").unfinished())
    assert acme.for_tenant("beta").marks.complete  # the store that searched is the one kept
