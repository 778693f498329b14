"""The session driver without Ray: against the real stages in this process (bit-exact with the
in-process generator) and against scripted fake stages (capacity, lifecycle, decode overlap,
cancellation). Prompt updates: test_prompts.py."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import torch

from histream_model.components import load_components
from histream_model.generator import HiStreamGenerator
from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, ReplicaLost, Unavailable
from services.media import read_video
from services.protocol import EndReason, IllegalTransition, SessionStatus, from_proto
from services.sessions import SessionDriver, StageHandles
from services.sessions import driver as driver_module
from tests.services.fakes import LocalHandle, fake_stages, real_stages
from tests.services.harness import FakeClock, record_statuses, run, session_plan, settle

NOTHING_HELD = {"structure": 0, "refine": 0, "decode": 0}


@pytest.fixture(scope="module")
def components():
    return load_components("tiny", device="cpu")


@pytest.mark.parametrize("mode", ["histream+", "no-drc"])
def test_video_through_the_real_stages_matches_the_generator(tmp_path, components, mode):
    store = tmp_path / "store"
    stages = real_stages(store)
    plan = session_plan(mode=mode, frames=33, object_id="video_drv", prompt="a red fox", seed=7)
    driver = SessionDriver(stages.handles, plan)
    statuses = record_statuses(driver)
    video = stages_pb2.VideoMetadata(id="video_drv", model="tiny", mode=mode, seed=7, size="96x64")

    async def go():
        await driver.open()
        chunks = [chunk async for chunk in driver.chunks()]
        return chunks, await driver.finish(EndReason.COMPLETED, video=video)

    chunks, frames = run(go())
    gen = HiStreamGenerator(components.dit, components.preset, mode)
    context = components.text.encode(["a red fox"])
    want = [r.latents for r in gen.generate(context, 64, 96, 33, seed=7)]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert all(torch.equal(from_proto(c.latents), w) for c, w in zip(chunks, want, strict=True))
    assert [c.num_frames for c in chunks] == [9, 12, 12] and frames == 33
    assert [c.first_frame for c in chunks] == [0, 9, 21]

    # every stage call but the (stateless) prompt encoding went to the session's replicas
    sid = driver.session_id
    assert sid.startswith("video_drv.")
    calls = stages.calls()
    for stage, method, routing, (request,) in calls:
        if method == "EncodePrompt":
            assert routing is None
        else:
            assert routing == sid, (stage, method)
            spec = getattr(request, "spec", None)
            assert (spec.session_id if spec else request.session_id) == sid
    ran = [(s, r.chunk_index, r.phase) for s, m, _, (r,) in calls if m == "RunPhase"]
    phases = {
        stage: sorted((c, p) for s, c, p in ran if s == stage) for stage in ("structure", "refine")
    }
    opened = [s for s, m, _, _ in calls if m in ("OpenSession", "OpenStream")]
    if mode == "no-drc":  # no low-res cache: the structure stage only encodes the prompt
        assert {m for s, m, _, _ in calls if s == "structure"} == {"EncodePrompt"}
        assert phases == {"structure": [], "refine": [(i, 0) for i in range(3)]}
        assert sorted(opened) == ["decode", "refine"]
    else:  # phase 0 from the driver, phase 2 handed on by the refine stage
        assert phases["structure"] == [(i, p) for i in range(3) for p in (0, 2)]
        assert phases["refine"] == [(i, 1) for i in range(3)]
        assert sorted(opened) == ["decode", "refine", "structure"]

    assert stages.held() == NOTHING_HELD
    assert statuses == [SessionStatus.OPENING, SessionStatus.RUNNING, SessionStatus.FINISHING,
                        SessionStatus.ENDED]  # fmt: skip
    run(driver.close(EndReason.CLOSED))  # closing an ended session keeps it ended
    assert (driver.status, driver.end_reason) == (SessionStatus.ENDED, EndReason.COMPLETED)
    prefix = store / "tenants/default/videos/video_drv"
    manifest = json.loads((prefix / "manifest.json").read_text())
    assert (manifest["num_frames"], manifest["seed"], manifest["mode"]) == (33, 7, mode)
    assert [o["name"] for o in manifest["objects"]] == ["video.mp4"]
    assert read_video(prefix / "video.mp4") == (33, 96, 64)


def test_open_retries_at_capacity_under_new_routing_ids(monkeypatch):
    clock = FakeClock().install(monkeypatch, driver_module)
    stages = fake_stages()
    stages.decode.fail("OpenStream", lambda: AtCapacity("decode pool full"), times=9)
    driver = SessionDriver(stages.handles, session_plan(object_id="video_cap"))

    run(driver.open(deadline_s=60))
    attempts = [r.session_id for (r,) in stages.handles.decode.called("OpenStream")]
    assert len(attempts) == len(set(attempts)) == 10
    assert all(a.startswith("video_cap.") for a in attempts) and attempts[-1] == driver.session_id
    # what the other stages opened on a refused attempt was closed under that attempt's id
    for stage in ("structure", "refine"):
        handle = getattr(stages.handles, stage)
        opened = [r.spec.session_id for (r,) in handle.called("OpenSession")]
        closes = [(m, sid, a[0].session_id) for m, sid, a in handle.calls if m == "CloseSession"]
        assert opened == attempts
        assert closes == [("CloseSession", a, a) for a in attempts[:-1]]
    assert stages.handles.decode.called("CloseStream") == []  # it never opened
    assert stages.held() == {"structure": 1, "refine": 1, "decode": 1}
    assert clock.sleeps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]  # doubling, capped
    assert driver.status == SessionStatus.RUNNING and driver.kv_bytes == 2000
    assert driver.init_segment == b"init"


def test_open_gives_up_at_capacity_after_its_deadline(monkeypatch):
    clock = FakeClock().install(monkeypatch, driver_module)
    stages = fake_stages()
    stages.decode.fail("OpenStream", lambda: AtCapacity("decode pool full"))
    driver = SessionDriver(stages.handles, session_plan())

    with pytest.raises(AtCapacity, match="decode pool full"):
        run(driver.open(deadline_s=0.3))
    assert clock.sleeps == [0.05, 0.1, 0.2]  # attempts at t = 0, 0.05, 0.15, 0.35 > 0.3
    assert len(stages.handles.decode.called("OpenStream")) == 4
    assert stages.held() == NOTHING_HELD and driver.status == SessionStatus.OPENING
    run(driver.close(EndReason.FAILED))
    assert (driver.status, driver.end_reason) == (SessionStatus.FAILED, EndReason.FAILED)


def test_a_stage_error_during_chunks_fails_the_session():
    stages = fake_stages()
    stages.refine.fail(
        "RunPhase", lambda: Unavailable("refine lost its GPU"), when=lambda r: r.chunk_index == 1
    )
    driver = SessionDriver(stages.handles, session_plan())
    statuses = record_statuses(driver)
    got = []

    async def go():
        await driver.open()
        with pytest.raises(Unavailable, match="refine lost its GPU"):
            async for chunk in driver.chunks():
                got.append(chunk.index)
        await driver.close(EndReason.FAILED)

    run(go())
    assert got == [0]  # chunk 0 was delivered before the error
    assert statuses == [SessionStatus.OPENING, SessionStatus.RUNNING, SessionStatus.FAILED]
    assert driver.end_reason == EndReason.FAILED and stages.held() == NOTHING_HELD
    closed = {(s, m, sid) for s, m, sid, _ in stages.calls() if m.startswith("Close")}
    sid = driver.session_id
    assert closed == {("structure", "CloseSession", sid), ("refine", "CloseSession", sid),
                      ("decode", "CloseStream", sid)}  # fmt: skip
    with pytest.raises(IllegalTransition, match="failed -> finishing is not allowed"):
        run(driver.finish())


def test_chunks_and_finish_refuse_a_session_that_is_not_open():
    driver = SessionDriver(fake_stages().handles, session_plan(object_id="video_x"))

    async def go():
        with pytest.raises(RuntimeError, match="session that is opening, not running") as err:
            await anext(driver.chunks())
        assert not isinstance(err.value, IllegalTransition)  # a plain RuntimeError
        with pytest.raises(IllegalTransition, match="video_x: opening -> finishing"):
            await driver.finish()

    run(go())
    assert driver.status == SessionStatus.OPENING


async def _blocked_decode_run(lookahead_check):
    """Chunk 0's decode waits on a gate: returns the highest chunk whose denoising started
    meanwhile, after checking the overlap, then lets the run finish and checks its order."""
    stages = fake_stages()
    journal = stages.journal
    gate = stages.decode.gate("DecodeChunk", when=lambda r: r.chunk_index == 0)
    driver = SessionDriver(stages.handles, session_plan(frames=69))  # 6 chunks
    await driver.open()
    events = []

    async def consume():
        async for chunk in driver.chunks():
            events.append(chunk)

    consumer = asyncio.create_task(consume())
    await journal.reached("DecodeChunk", chunk=0)
    await journal.reached("RunPhase", stage="refine", chunk=1)  # denoising overlaps decoding
    await settle()
    started = max(e.chunk for e in journal.find("RunPhase"))
    assert events == [] and not journal.find("DecodeChunk", what="exit")
    assert [e.chunk for e in journal.find("DecodeChunk")] == [0]  # decodes wait their turn
    lookahead_check(started, driver.lookahead)
    gate.set()
    await consumer
    assert [e.index for e in events] == list(range(6))
    assert [e.chunk for e in journal.find("DecodeChunk")] == list(range(6))
    for i in range(1, 6):  # decode calls of a session never overlap: each after the last
        done = journal.position("DecodeChunk", what="exit", chunk=i - 1)
        assert journal.position("DecodeChunk", chunk=i) > done


def test_decoding_overlaps_denoising_in_chunk_order():
    def check(started, lookahead):
        # the queue holds `lookahead` decoded-to-be chunks and the producer one more
        assert 1 <= started <= lookahead + 1

    run(_blocked_decode_run(check))


def test_denoising_runs_at_most_lookahead_chunks_ahead():
    def check(started, lookahead):
        assert started <= lookahead

    run(_blocked_decode_run(check))


def test_closing_chunks_early_cancels_the_work_and_close_frees_every_stage():
    stages = fake_stages()
    journal = stages.journal
    stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    driver = SessionDriver(stages.handles, session_plan())

    async def go():
        await driver.open()
        chunks = driver.chunks()
        first = await anext(chunks)
        await journal.reached("RunPhase", stage="structure", chunk=1)
        await chunks.aclose()
        assert journal.find("RunPhase", what="cancel", chunk=1)  # the pending phase was cancelled
        assert stages.held() == {"structure": 1, "refine": 1, "decode": 1}
        await driver.close()
        return first

    assert run(go()).index == 0
    assert not journal.find("RunPhase", chunk=2)
    assert stages.held() == NOTHING_HELD
    sid = driver.session_id
    closes = sorted((s, m, r, a[0].session_id) for s, m, r, a in stages.calls() if "Close" in m)
    assert closes == [("decode", "CloseStream", sid, sid), ("refine", "CloseSession", sid, sid),
                      ("structure", "CloseSession", sid, sid)]  # fmt: skip
    assert (driver.status, driver.end_reason) == (SessionStatus.CLOSED, EndReason.CLOSED)
    assert not stages.handles.decode.called("FinishStream")


def test_close_completes_its_releases_while_its_task_is_cancelled():
    stages = fake_stages()
    journal = stages.journal
    stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    release = stages.structure.gate("CloseSession")
    driver = SessionDriver(stages.handles, session_plan())

    async def job():  # how the job runner drives a session it may be cancelled out of
        try:
            async for _ in driver.chunks():
                pass
        finally:
            await driver.close(EndReason.CANCELLED)

    async def go():
        await driver.open()
        task = asyncio.create_task(job())
        await journal.reached("RunPhase", stage="structure", chunk=1)
        task.cancel()  # cancels the chunks; close() starts the releases
        await journal.reached("CloseSession", stage="structure")
        task.cancel()  # ... and the task is cancelled again while close() waits for them
        with pytest.raises(asyncio.CancelledError):
            await task
        assert journal.find("RunPhase", what="cancel", chunk=1)
        assert not journal.find("CloseSession", stage="structure", what="cancel")
        release.set()
        await journal.until(lambda: stages.held() == NOTHING_HELD)

    run(go())
    sid = driver.session_id
    closes = sorted((s, m, r) for s, m, r, _ in stages.calls() if "Close" in m)
    assert closes == [("decode", "CloseStream", sid), ("refine", "CloseSession", sid),
                      ("structure", "CloseSession", sid)]  # fmt: skip
    assert len(journal.find("CloseSession", what="exit")) == 2


def test_an_open_cancelled_while_a_stage_opens_leaves_nothing_held(tmp_path):
    """As with Serve, a stage call runs on when its caller is cancelled: a session closed while
    its open was still in flight must not be added by that open afterwards."""
    stages = real_stages(tmp_path / "store")
    stages.handles = StageHandles(
        *(LocalHandle(getattr(stages, s), detached=True) for s in ("structure", "refine", "decode"))
    )
    gate = stages.refine.gate("OpenSession")
    driver = SessionDriver(stages.handles, session_plan())

    async def go():
        opening = asyncio.create_task(driver.open())
        await stages.journal.reached("OpenSession", stage="refine")
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
        await driver.close()  # closes every stage it asked, the refine stage too
        gate.set()  # the refine stage's open goes on, and is refused
        await stages.journal.until(
            lambda: stages.journal.find("OpenSession", stage="refine", what="raise")
        )

    run(go())
    assert stages.held() == NOTHING_HELD
    assert driver.status == SessionStatus.CLOSED


def test_a_stuck_chunk_is_logged_with_where_the_session_waits(monkeypatch, caplog):
    """A session that makes no progress says so in the log, with the await it is stuck on,
    and goes on once the call returns."""
    monkeypatch.setattr(driver_module, "STALL_LOG_S", 0.05)
    stages = fake_stages()
    gate = stages.decode.gate("DecodeChunk", when=lambda r: r.chunk_index == 0)
    driver = SessionDriver(stages.handles, session_plan(frames=33))

    async def go():
        await driver.open()
        chunks = []

        async def consume():
            async for chunk in driver.chunks():
                chunks.append(chunk.index)

        consumer = asyncio.create_task(consume())
        while "no progress" not in caplog.text:
            await asyncio.sleep(0.01)
        gate.set()
        await consumer
        return chunks

    with caplog.at_level("WARNING", logger="histream.sessions"):
        assert run(go()) == [0, 1, 2]
    stuck = [r.getMessage() for r in caplog.records if "no progress" in r.getMessage()]
    assert stuck[0].startswith(f"session {driver.session_id}: no progress for 0 s")
    assert "in decode" in stuck[0]  # the stack names the decode awaiting its stage call


@pytest.mark.parametrize(
    ("stage", "method"),
    [("structure", "EncodePrompt"), ("refine", "OpenSession"), ("decode", "OpenStream"),
     ("decode", "FinishStream")],
)  # fmt: skip
def test_a_call_lost_with_its_replica_before_any_chunk_is_made_again(tmp_path, stage, method):
    """Encoding the prompt, opening on a stage and sealing the media are asked again when the
    replica is lost (or silent) under the call: the video completes all the same."""
    stages = real_stages(tmp_path / "store")
    lost = ReplicaLost("no answer from the replica within 20 s (stage_call_timeout_s)")
    getattr(stages, stage).fail(method, lambda: lost, times=1)
    driver = SessionDriver(stages.handles, session_plan(frames=33))

    async def go():
        if method == "EncodePrompt":
            await driver.stages.encode("a heron")
        await driver.open()
        chunks = [c.index async for c in driver.chunks()]
        video = stages_pb2.VideoMetadata(id="video_1", model="tiny", seed=3, size="96x64")
        return chunks, await driver.finish(EndReason.COMPLETED, video=video)

    chunks, frames = run(go())
    assert chunks == [0, 1, 2] and frames == 33
    assert len(stages.journal.find(method, what="raise")) == 1
    assert driver.status == SessionStatus.ENDED and stages.held() == NOTHING_HELD
