"""Video jobs without Ray: records in a local directory, the real stages in this process or fake
ones; gates catch a job in each state."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from services.errors import AtCapacity, QueueFull, Unavailable
from services.jobs import VideoStatus
from services.sessions import driver as driver_module
from services.storage import Layout, delete_video, is_deleted
from tests.services.fakes import fake_stages, real_stages
from tests.services.harness import FakeClock, run, settle
from tests.services.jobs.helpers import NOTHING_HELD, TTL_S, Jobs


def test_a_job_goes_queued_in_progress_completed_and_publishes(tmp_path):
    jobs = Jobs(tmp_path, real_stages(tmp_path / "store"))
    gate = jobs.stages.decode.gate("DecodeChunk", when=lambda r: r.chunk_index == 0)

    async def go():
        record, task = await jobs.submit()
        assert (record.status, record.progress) == (VideoStatus.queued, 0)
        stored = await jobs.records.get(record.id)
        assert stored.status == VideoStatus.queued and stored.completed_at is None
        await jobs.stages.journal.reached("DecodeChunk", chunk=0)
        stored = await jobs.records.get(record.id)
        assert (stored.status, stored.progress) == (VideoStatus.in_progress, 0)
        gate.set()
        await task
        return await jobs.records.get(record.id), await jobs.records.content(record.id)

    done, mp4 = run(go())
    assert (done.status, done.progress, done.error) == (VideoStatus.completed, 100, None)
    assert done.completed_at >= done.created_at and done.expires_at == done.completed_at + TTL_S
    assert jobs.storage.records == [("queued", 0), ("in_progress", 0), ("in_progress", 50),
                                    ("in_progress", 99), ("completed", 100)]  # fmt: skip
    assert jobs.objects(done.id) == ["manifest.json", "record.json", "video.mp4"]
    assert mp4[4:8] == b"ftyp"
    manifest = json.loads(jobs.storage.get(Layout().video_manifest_key(done.id)))
    assert (manifest["id"], manifest["num_frames"], manifest["seed"]) == (done.id, 21, 5)
    assert (manifest["size"], manifest["mode"], manifest["fps"]) == ("96x64", "histream+", 16)
    assert jobs.observer.chunks == [0, 1] and jobs.observer.ended == [VideoStatus.completed]
    assert jobs.stages.held() == NOTHING_HELD and jobs.runner.tasks == {}
    # every stage call of the job went to the replicas holding its session
    routing = jobs.observer.drivers[0].session_id
    assert routing.startswith(done.id + ".")
    assert {r for _, m, r, _ in jobs.stages.calls() if m != "EncodePrompt"} == {routing}


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            lambda: Unavailable("refine lost its GPU"),
            "service_unavailable",
            "^refine lost its GPU$",
        ),
        # an unexpected failure is not described to the client: an error id stands for it
        (
            lambda: ValueError("bad tensor"),
            "internal_error",
            "^internal error while generating "
            r"video video_\w+; quote err_[0-9a-f]{16} when reporting it$",
        ),
    ],
)
def test_a_stage_failure_fails_the_record_with_its_error(tmp_path, error, code, message):
    jobs = Jobs(tmp_path, fake_stages())
    jobs.stages.refine.fail("RunPhase", error, when=lambda r: r.chunk_index == 1)

    async def go():
        record, task = await jobs.submit()
        await task
        return await jobs.records.get(record.id)

    failed = run(go())
    assert failed.status == VideoStatus.failed and failed.completed_at is None
    assert failed.error.code == code and re.match(message, failed.error.message)
    assert "bad tensor" not in failed.error.message
    assert jobs.storage.records[-1] == ("failed", failed.progress) and failed.progress < 100
    assert jobs.observer.ended == [VideoStatus.failed]
    assert not jobs.stages.handles.decode.called("FinishStream")
    assert jobs.stages.held() == NOTHING_HELD and jobs.objects(failed.id) == ["record.json"]


def test_a_job_that_never_gets_capacity_fails_from_the_queue(tmp_path, monkeypatch):
    clock = FakeClock().install(monkeypatch, driver_module)
    jobs = Jobs(tmp_path, fake_stages(), queue_timeout_s=0.1)
    jobs.stages.decode.fail("OpenStream", lambda: AtCapacity("decode pool full"))

    async def go():
        record, task = await jobs.submit()
        await task
        return await jobs.records.get(record.id)

    failed = run(go())
    assert jobs.storage.records == [("queued", 0), ("failed", 0)]
    assert (failed.error.code, failed.error.message) == ("at_capacity", "decode pool full")
    assert clock.sleeps == [0.05, 0.1] and jobs.stages.held() == NOTHING_HELD


def test_cancel_stops_a_running_job_and_frees_its_stages(tmp_path):
    jobs = Jobs(tmp_path, fake_stages())
    journal = jobs.stages.journal
    jobs.stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, task = await jobs.submit()
        await journal.reached("RunPhase", stage="structure", chunk=1)
        await jobs.stored("in_progress", 50)  # chunk 0 is done; chunk 1 is being denoised
        assert jobs.stages.held() == {"structure": 1, "refine": 1, "decode": 1}
        assert await jobs.runner.cancel(record.id) is True
        assert task.cancelled() and jobs.runner.tasks == {}
        assert await jobs.runner.cancel(record.id) is False  # no longer running
        return record.id

    video_id = run(go())
    assert journal.find("RunPhase", what="cancel", chunk=1)
    assert jobs.stages.held() == NOTHING_HELD
    routing = jobs.observer.drivers[0].session_id
    closes = sorted((s, m, r) for s, m, r, _ in jobs.stages.calls() if "Close" in m)
    assert closes == [("decode", "CloseStream", routing), ("refine", "CloseSession", routing),
                      ("structure", "CloseSession", routing)]  # fmt: skip
    assert not jobs.stages.handles.decode.called("FinishStream")
    # the record is left as it was (deleting a video cancels its job, then deletes the record)
    assert jobs.storage.records[-1] == ("in_progress", 50) and jobs.observer.ended == []
    assert jobs.objects(video_id) == ["record.json"]


def test_a_record_deleted_mid_run_stops_the_job_without_writing_it_back(tmp_path):
    jobs = Jobs(tmp_path, fake_stages())
    journal = jobs.stages.journal
    gate = jobs.stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, task = await jobs.submit()
        await journal.reached("RunPhase", stage="structure", chunk=1)
        await jobs.stored("in_progress", 50)  # no record update is in flight now
        await jobs.records.delete(record.id)  # e.g. by another gateway replica
        gate.set()
        await task  # stops quietly
        assert not await jobs.records.exists(record.id)
        return record.id

    video_id = run(go())
    assert jobs.objects(video_id) == []
    assert not jobs.stages.handles.decode.called("FinishStream")
    assert jobs.stages.held() == NOTHING_HELD
    assert ("completed", 100) not in jobs.storage.records


def test_jobs_beyond_max_running_wait_for_a_slot(tmp_path):
    jobs = Jobs(tmp_path, fake_stages(), max_running=1)
    journal = jobs.stages.journal
    gate = jobs.stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 0)

    async def go():
        first, first_task = await jobs.submit(seed=1)
        second, second_task = await jobs.submit(seed=2)
        await journal.reached("RunPhase", stage="structure", chunk=0)
        await settle()
        assert len(journal.find("EncodePrompt")) == 1  # the second has not started opening
        assert (await jobs.records.get(second.id)).status == VideoStatus.queued
        gate.set()
        await asyncio.gather(first_task, second_task)
        return [(await jobs.records.get(r.id)).status for r in (first, second)]

    assert run(go()) == [VideoStatus.completed, VideoStatus.completed]
    opened = [e.session_id for e in journal.find("OpenStream")]
    finished = [e.session_id for e in journal.find("FinishStream", what="exit")]
    assert opened == finished and len(set(opened)) == 2  # one after the other
    assert journal.position("OpenStream", session_id=opened[1]) > journal.position(
        "FinishStream", what="exit", session_id=opened[0]
    )


def test_a_full_queue_refuses_at_once_and_a_job_waits_for_a_slot_at_most_the_timeout(tmp_path):
    jobs = Jobs(tmp_path, fake_stages(), max_running=1, max_queued=1, queue_timeout_s=0.2)
    gate = jobs.stages.structure.gate("RunPhase")

    async def go():
        _, running = await jobs.submit(seed=1)
        await jobs.stages.journal.reached("RunPhase", stage="structure")
        waiting, waiting_task = await jobs.submit(seed=2)  # the one place to wait
        with pytest.raises(QueueFull, match=r"max_queued_jobs=1\); retry after 5 s") as err:
            await jobs.submit(seed=3)
        assert err.value.retry_after_s == 5 and err.value.http_status == 429
        await waiting_task  # no slot frees within the 0.2 s queue timeout
        timed_out = await jobs.records.get(waiting.id)
        gate.set()
        await running
        return timed_out

    timed_out = run(go())
    assert timed_out.status == VideoStatus.failed and timed_out.error.code == "queue_timeout"
    assert "waited 0.2 s for a job slot" in timed_out.error.message
    assert jobs.runner.waiting == 0 and jobs.stages.held() == NOTHING_HELD


def test_a_record_deleted_while_publishing_leaves_no_objects(tmp_path):
    jobs = Jobs(tmp_path, real_stages(tmp_path / "store"))
    gate = jobs.stages.decode.gate("FinishStream")

    async def go():
        record, task = await jobs.submit()
        await jobs.stages.journal.reached("FinishStream")
        await jobs.records.delete(record.id)
        gate.set()
        await task
        assert not await jobs.records.exists(record.id)
        return record.id

    video_id = run(go())
    assert jobs.stages.held() == NOTHING_HELD
    assert jobs.objects(video_id) == []


def test_a_record_deleted_during_a_progress_update_stays_deleted(tmp_path):
    """Storage has no compare-and-swap: a delete landing between a progress update's check
    and its write is undone by the write, then found by its tombstone and done again; the job
    stops there and nothing of the video is left."""
    jobs = Jobs(tmp_path, fake_stages())
    gate = jobs.stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)

    async def go():
        record, task = await jobs.submit()
        await jobs.stages.journal.reached("RunPhase", stage="structure", chunk=1)
        await jobs.stored("in_progress", 50)

        def delete_once_found(key: str) -> None:  # after the next check of the record itself
            if not key.endswith("/record.json"):
                jobs.storage.on_exists = delete_once_found
                return
            delete_video(jobs.storage, Layout(), record.id)

        # chunk 1's progress update: the record is found, then deleted before it is written
        jobs.storage.on_exists = delete_once_found
        gate.set()
        await task
        return record.id, await jobs.records.exists(record.id)

    video_id, exists = run(go())
    assert ("in_progress", 99) in jobs.storage.records  # the update did write it back
    assert not exists and jobs.objects(video_id) == []
    assert ("completed", 100) not in jobs.storage.records  # it never ran on to completed
    assert is_deleted(jobs.storage, Layout(), video_id)
