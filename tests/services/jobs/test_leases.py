"""Jobs that outlive their gateway replica (services.jobs.leases), without Ray: two runners over
one store stand for two gateway replicas, or for the service before and after a restart."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.jobs import VideoRecord, VideoStatus, leases
from services.media import decode_frames
from services.protocol import StreamKind
from services.sessions import SnapshotStore
from services.storage import Layout, delete_video, is_deleted
from tests.services.fakes import fake_stages, real_stages
from tests.services.harness import run
from tests.services.jobs.helpers import NOTHING_HELD, Jobs


@pytest.fixture(autouse=True)
def quick_claims(monkeypatch):
    monkeypatch.setattr(leases, "CLAIM_SETTLE_S", 0.05)


def replica(tmp_path, stages, name: str, shared: Jobs | None = None, **kw) -> Jobs:
    jobs = Jobs(tmp_path, stages, storage=shared.storage if shared else None, **kw)
    jobs.runner.owner = name
    return jobs


async def expire(jobs: Jobs, video_id: str, **changes) -> None:
    """What a record looks like once its replica stopped renewing it (it died) long ago."""
    record = await jobs.records.get(video_id)
    for field, value in {"lease_until": 0, **changes}.items():
        setattr(record, field, value)
    await jobs.records.put(record)


async def left_opening(jobs: Jobs, stages, opening) -> VideoRecord:
    """A job whose replica died while opening it (its record queued, its lease run out long
    ago); the stages let the next opening through."""
    record, task = await jobs.submit()
    await stages.journal.reached("EncodePrompt")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await expire(jobs, record.id)
    opening.set()
    return record


def test_a_job_drained_on_one_replica_goes_on_from_its_snapshot_on_another(tmp_path):
    stages = real_stages(tmp_path / "store")
    first = replica(tmp_path, stages, "a", snapshots=True)
    second = replica(tmp_path, stages, "b", first, snapshots=True)
    whole = replica(tmp_path, stages, "c", first, snapshots=True)
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, _ = await first.submit(seed=9, frames=33)  # 3 chunks
        await stages.journal.reached("RunPhase", stage="structure", chunk=1)
        await first.stored("in_progress", 33)
        assert second.runner.live == {} and await second.runner.adopter.sweep() == []
        drain = asyncio.ensure_future(first.runner.drain())
        gate.set()  # the chunk started goes on while the drain settles
        assert await drain == 1
        left = await first.records.get(record.id)
        assert (left.status, left.owner, left.lease_until) == (VideoStatus.in_progress, "a", 0)
        snapshot = await SnapshotStore(first.storage, Layout()).load("video", record.id)
        assert await second.runner.adopter.sweep() == [record.id]
        await second.runner.tasks[record.id]
        done = await second.records.get(record.id)
        reference, task = await whole.submit(seed=9, frames=33)
        await task
        mp4s = [await first.records.content(v) for v in (record.id, reference.id)]
        return snapshot, done, mp4s

    snapshot, done, (mp4, reference) = run(go(), timeout_s=60)
    assert snapshot.next_chunk == 2  # chunk 1 was finished by the drain's settle
    assert (done.status, done.progress, done.attempts, done.owner) == (
        VideoStatus.completed, 100, 2, "b",
    )  # fmt: skip
    assert second.observer.chunks == [2]  # only what was left
    assert second.observer.restores == []  # the stages still held its caches: taken up as is
    frames = decode_frames(mp4)
    assert frames.shape[0] == 33
    assert np.array_equal(frames, decode_frames(reference))
    assert stages.held() == NOTHING_HELD
    assert first.objects(done.id) == ["manifest.json", "record.json", "video.mp4"]


def test_a_drain_landing_while_a_chunks_progress_is_stored_still_settles_the_chunk_started(
    tmp_path,
):
    stages = real_stages(tmp_path / "store")
    first = replica(tmp_path, stages, "a", snapshots=True)
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    storing, update = asyncio.Event(), first.runner._update

    async def stalled_update(record, lease=True):
        if record.progress == 33 and lease:  # chunk 0's progress: the drain lands in it
            storing.set()
            await asyncio.Event().wait()
        await update(record, lease)

    first.runner._update = stalled_update

    async def go():
        record, _ = await first.submit(seed=9, frames=33)  # 3 chunks
        await asyncio.gather(
            storing.wait(), stages.journal.reached("RunPhase", stage="structure", chunk=1)
        )
        drain = asyncio.ensure_future(first.runner.drain())
        gate.set()
        assert await drain == 1
        store = SnapshotStore(first.storage, Layout())
        return await store.load("video", record.id), await first.records.get(record.id)

    snapshot, left = run(go(), timeout_s=60)
    assert snapshot.next_chunk == 2  # chunk 1, started, was finished before the snapshot
    assert (left.status, left.lease_until) == (VideoStatus.in_progress, 0)


def test_a_queued_job_whose_replica_died_is_run_from_the_start(tmp_path):
    stages = fake_stages()
    first = replica(tmp_path, stages, "a")
    second = replica(tmp_path, stages, "b", first)
    opening = stages.structure.gate("EncodePrompt")  # the job never gets past opening on "a"

    async def go():
        record, task = await first.submit()
        await stages.journal.reached("EncodePrompt")
        task.cancel()  # "a" is gone; its record stays as it was
        await asyncio.gather(task, return_exceptions=True)
        await expire(first, record.id)
        opening.set()
        assert await second.runner.adopter.sweep() == [record.id]
        assert await second.runner.adopter.sweep() == []  # taken: leased again
        await second.runner.tasks[record.id]
        return await second.records.get(record.id)

    done = run(go())
    assert (done.status, done.attempts, done.owner) == (VideoStatus.completed, 2, "b")
    assert second.observer.chunks == [0, 1]


def test_a_job_interrupted_max_job_attempts_times_fails_and_leaves_nothing(tmp_path):
    stages = real_stages(tmp_path / "store")
    first = replica(tmp_path, stages, "a", snapshots=True)
    second = replica(tmp_path, stages, "b", first, snapshots=True, max_job_attempts=3)
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, _ = await first.submit(frames=33)
        await stages.journal.reached("RunPhase", stage="structure", chunk=1)
        await first.stored("in_progress", 33)
        drain = asyncio.ensure_future(first.runner.drain())
        gate.set()
        await drain
        await expire(first, record.id, attempts=3)  # started three times already
        assert await second.runner.adopter.sweep() == [record.id]
        assert second.runner.tasks == {}
        return await second.records.get(record.id)

    failed = run(go(), timeout_s=60)
    assert failed.status == VideoStatus.failed and failed.error.code == "job_interrupted"
    assert f"video {failed.id} was interrupted 3 times" in failed.error.message
    assert first.objects(failed.id) == ["record.json"]  # its parts are gone
    store = SnapshotStore(first.storage, Layout())
    assert run(store.load(str(StreamKind.VIDEO), failed.id)) is None
    assert "owner" not in failed.public() and "attempts" not in failed.public()


def test_of_two_replicas_claiming_one_job_at_once_one_runs_it(tmp_path):
    stages = fake_stages()
    first = replica(tmp_path, stages, "a")
    second = replica(tmp_path, stages, "b", first)
    third = replica(tmp_path, stages, "c", first)
    opening = stages.structure.gate("EncodePrompt")

    async def go():
        record = await left_opening(first, stages, opening)
        taken = await asyncio.gather(second.runner.adopter.sweep(), third.runner.adopter.sweep())
        running = [j for j in (second, third) if record.id in j.runner.tasks]
        await asyncio.gather(*(j.runner.tasks[record.id] for j in running))
        return record.id, taken, running, await first.records.get(record.id)

    video_id, taken, running, done = run(go())
    assert sorted(taken) == [[], [video_id]] and len(running) == 1
    assert done.status == VideoStatus.completed and done.owner == running[0].runner.owner


def test_a_running_job_renews_its_lease_and_is_not_taken(tmp_path):
    stages = fake_stages()
    first = replica(tmp_path, stages, "a", job_lease_s=30)
    second = replica(tmp_path, stages, "b", first)
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, task = await first.submit()
        await stages.journal.reached("RunPhase", stage="structure", chunk=1)
        await first.stored("in_progress", 50)
        held = await first.records.get(record.id)
        assert held.owner == "a" and held.lease_until >= held.created_at + 29
        assert await second.runner.adopter.sweep() == []
        await expire(first, record.id)  # as if "a" had not renewed it for a while
        await first.runner.renew()
        renewed = await first.records.get(record.id)
        gate.set()
        await task
        return renewed

    renewed = run(go())
    assert renewed.lease_until >= renewed.created_at + 29 and renewed.owner == "a"
    assert second.runner.tasks == {}


def test_a_job_deleted_as_a_replica_claims_it_is_not_taken_up(tmp_path, monkeypatch):
    """The claim's write lands after the delete (storage has no compare-and-swap) and brings
    the record back; the delete's tombstone is found and the delete done again."""
    stages = fake_stages()
    first = replica(tmp_path, stages, "a")
    second = replica(tmp_path, stages, "b", first)
    opening = stages.structure.gate("EncodePrompt")
    storage, put = first.storage, first.storage.put

    async def go():
        record = await left_opening(first, stages, opening)

        def deleted_just_before(key, data, content_type=None):  # the claim's write of "b"
            if key.endswith("/record.json") and b'"owner":"b"' in data:
                monkeypatch.setattr(storage, "put", put)
                delete_video(storage, Layout(), record.id)
            put(key, data, content_type)

        monkeypatch.setattr(storage, "put", deleted_just_before)
        taken = await second.runner.adopter.sweep()
        return record.id, taken, await first.records.exists(record.id)

    video_id, taken, exists = run(go())
    assert taken == [] and second.runner.tasks == {}
    assert not exists and first.objects(video_id) == []


def test_the_adopter_sweeps_old_tombstones_of_every_tenant_every_ten_minutes(tmp_path, monkeypatch):
    jobs = replica(tmp_path, fake_stages(), "a")
    adopter = jobs.runner.adopter
    adopter.tenants = lambda: ["default", "acme"]
    monkeypatch.setattr(leases, "TOMBSTONE_TTL_S", -1.0)  # any tombstone is old
    stones = [(Layout(tenant), "video_1") for tenant in ("default", "acme", "other")]
    for layout, video_id in stones:
        delete_video(jobs.storage, layout, video_id)
    run(adopter.tick())
    assert [is_deleted(jobs.storage, *stone) for stone in stones] == [False, False, True]
    delete_video(jobs.storage, Layout(), "video_2")
    run(adopter.tick())  # within TOMBSTONE_SWEEP_S of the last sweep: kept
    assert is_deleted(jobs.storage, Layout(), "video_2")
    adopter.next_tombstone_sweep -= leases.TOMBSTONE_SWEEP_S
    run(adopter.tick())
    assert not is_deleted(jobs.storage, Layout(), "video_2")
