"""The denoising and decode stages' admission and reaping, in this process (no Ray): session
and byte budgets, unknown and unheld sessions, kept sessions giving way, idle sessions and
abandoned decode streams reaped (on demand and by the background reaper)."""

from __future__ import annotations

import asyncio

import pytest

from histream_model.components import load_components
from histream_model.generator import HiStreamGenerator
from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, InvalidArgument, SessionNotHeld
from services.protocol import to_proto
from services.settings import ServeSettings
from services.stages import DecodeStage, SessionTable, StructureStage
from services.storage import StorageSettings
from tests.services.stages.helpers import H, W, open_two, spec, video_stream


def test_admission_limit_and_unknown_sessions(settings):
    structure = StructureStage(settings)

    async def run() -> None:
        context = await open_two(structure)
        with pytest.raises(AtCapacity, match="holds 2 sessions, its limit"):
            await structure.OpenSession(
                stages_pb2.OpenSessionRequest(spec=spec("c"), context=context)
            )
        with pytest.raises(InvalidArgument, match="already open"):
            await structure.OpenSession(
                stages_pb2.OpenSessionRequest(spec=spec("a"), context=context)
            )
        with pytest.raises(SessionNotHeld, match="does not hold session 'zzz'"):
            await structure.RunPhase(stages_pb2.PhaseRequest(session_id="zzz", chunk_index=0))
        with pytest.raises(
            InvalidArgument, match=r"runs on cache 'high'; the structure stage holds \['low'\]"
        ):
            await structure.RunPhase(stages_pb2.PhaseRequest(session_id="a", phase=1))
        with pytest.raises(InvalidArgument, match=r"phase 3 outside \[0, 3\) of chunk 0"):
            await structure.RunPhase(stages_pb2.PhaseRequest(session_id="a", phase=3))
        with pytest.raises(InvalidArgument, match=r"chunk index 2 outside \[0, 2\)"):
            await structure.RunPhase(stages_pb2.PhaseRequest(session_id="a", chunk_index=2))
        with pytest.raises(InvalidArgument, match="height=72 must be"):
            bad = spec("d")
            bad.height, bad.mode = 72, "histream"
            await structure.OpenSession(stages_pb2.OpenSessionRequest(spec=bad, context=context))
        freed = await structure.CloseSession(stages_pb2.ReleaseRequest(session_id="a"))
        assert freed.kv_bytes > 0 and structure.stats()["sessions"] == 1

    asyncio.run(run())


def test_idle_sessions_are_reaped():
    now = [0.0]
    table: SessionTable[str] = SessionTable("test stage", capacity=4, clock=lambda: now[0])
    table.add("old", "x")
    now[0] = 5.0
    table.add("new", "y")
    now[0] = 12.0
    table.get("new")  # use keeps it alive
    assert table.idle(10.0) == ["old"]
    now[0] = 30.0
    assert sorted(table.idle(10.0)) == ["new", "old"]


def test_a_kept_session_waits_its_time_then_goes_and_yields_room_first():
    now = [0.0]
    table: SessionTable[str] = SessionTable("test stage", capacity=2, clock=lambda: now[0])
    table.add("a", "x")
    table.add("b", "y")
    assert not table.keep("nobody", 5.0)
    assert table.keep("a", 30.0) and table.keep("b", 10.0)
    now[0] = 20.0  # idle longer than the timeout, but kept: only b's time has passed
    assert table.idle(15.0) == ["b"]
    assert table.evictable() == ["b", "a"][:1]  # full: the soonest-expiring kept one
    assert table.take_up("a") == "x" and table.take_up("a") is None  # claimed once
    assert table.idle(15.0) == ["b"]  # a is in use again (used at 20)
    table.pop("b")
    assert table.evictable() == []  # room left


def test_decode_stage_reaps_an_abandoned_stream(settings):
    settings = settings.model_copy(update={"session_idle_timeout_s": 0.01})
    decode = DecodeStage(settings)

    async def run() -> None:
        await decode.OpenStream(video_stream("s", "s"))
        decode._reaper.cancel()  # only the reap() below acts (the loop's is tested elsewhere)
        assert decode.stats()["sessions"] == 1
        await asyncio.sleep(0.05)
        assert decode.reap() == ["s"]
        assert decode.stats()["sessions"] == 0

    asyncio.run(run())


def test_a_session_closed_before_it_opened_cannot_be_added():
    table: SessionTable[str] = SessionTable("test stage", capacity=4)
    assert table.pop("late") is None  # the close arrived first
    with pytest.raises(SessionNotHeld, match="'late' was closed on this test stage before"):
        table.add("late", "x")
    table.add("other", "y")  # other ids are unaffected
    assert len(table) == 1


def test_a_byte_budget_admits_exactly_the_sessions_whose_bytes_fit(tmp_path):
    """A session's bytes are known before it is allocated and equal what it then holds; with a
    budget of exactly two sessions' bytes, a third waits (at_capacity) until one closes, and
    the sessions-per-replica count is not what stops it."""
    probe = StructureStage(ServeSettings(preset="tiny"))
    from services.protocol import shape_of

    one = probe.session_bytes(shape_of(spec("x"), probe.preset))
    settings = ServeSettings(
        preset="tiny", max_sessions_per_replica=8, stage_budget_bytes=2 * one,
        storage=StorageSettings(local_dir=str(tmp_path / "store")),
    )  # fmt: skip
    structure = StructureStage(settings)

    async def run() -> None:
        context = await open_two(structure)
        state = structure.sessions.get("a").states["low"]
        text = sum(t.nbytes for t in (*state.text.k, *state.text.v))
        assert state.cache.nbytes + text == one  # the model's figure is the allocation
        assert structure.stats()["bytes_held"] == 2 * one == structure.stats()["budget_bytes"]
        with pytest.raises(AtCapacity, match=f"holds {2 * one} bytes of sessions and this one "
                           f"needs {one}: over its budget"):  # fmt: skip
            await structure.OpenSession(
                stages_pb2.OpenSessionRequest(spec=spec("c"), context=context)
            )
        # a full-history session of the same length needs more than a sliding-window one
        longer = probe.session_bytes(shape_of(spec("y", mode="no-agsw", frames=201), probe.preset))
        shorter = probe.session_bytes(shape_of(spec("y", frames=201), probe.preset))
        assert longer > shorter
        await structure.CloseSession(stages_pb2.ReleaseRequest(session_id="a"))
        assert structure.stats()["bytes_held"] == one
        await structure.OpenSession(stages_pb2.OpenSessionRequest(spec=spec("c"), context=context))

    asyncio.run(run())


def test_kept_sessions_give_way_to_the_bytes_a_new_one_needs():
    table = SessionTable("stage", capacity=8, clock=lambda: 0.0, budget_bytes=100)
    table.add("kept-1", "s", 30)
    table.add("kept-2", "s", 30)
    table.add("live", "s", 30)
    table.keep("kept-2", 5.0)
    table.keep("kept-1", 9.0)
    assert table.evictable(10) == []  # 90 + 10 fit
    assert table.evictable(40) == ["kept-2"]  # the sooner-expiring one goes first
    assert table.evictable(70) == ["kept-2", "kept-1"]
    with pytest.raises(AtCapacity, match="holds 90 bytes"):
        table.check_room("new", 40)


def test_the_background_reaper_frees_an_idle_session_on_its_own(tmp_path):
    """README: a session unused for `session_idle_timeout_s` is freed by the stage itself (a
    driver that vanished without closing). The reaper starts with the first session and wakes
    every max(0.5 s, timeout / 4); the session table's clock is faked, so what frees the session
    is the loop seeing the fake time pass, not the test calling `reap()`."""
    settings = ServeSettings(
        preset="tiny", session_idle_timeout_s=1.0,
        storage=StorageSettings(local_dir=str(tmp_path / "store")),
    )  # fmt: skip
    structure = StructureStage(settings)
    now = [0.0]
    structure.sessions.clock = lambda: now[0]

    async def run() -> tuple[int, int, int]:
        await open_two(structure)
        await asyncio.sleep(1.2)  # two wakes: the fake clock has not moved, so both stay
        kept = structure.stats()["sessions"]
        structure.sessions.get("a")  # used at t = 0 ...
        now[0] = 0.8
        structure.sessions.get("b")  # ... and at 0.8
        now[0] = 1.5  # a idle 1.5 s > 1 s; b 0.7 s
        for _ in range(40):  # up to 4 s for the next wake
            if structure.stats()["sessions"] < 2:
                break
            await asyncio.sleep(0.1)
        one = structure.stats()["sessions"]
        with pytest.raises(SessionNotHeld):
            structure.sessions.get("a")
        now[0] = 10.0
        for _ in range(40):
            if structure.stats()["sessions"] == 0:
                break
            await asyncio.sleep(0.1)
        return kept, one, structure.stats()["sessions"]

    assert asyncio.run(run()) == (2, 1, 0)


def test_a_decode_stream_left_behind_answers_as_not_held(settings):
    """CI caught this: a session moved to a new decode replica (scale-up) and back to its old
    one (scale-down 8 s later); the old one still held its stream as of chunk 6 and was asked
    for chunk 8, and its playlist writer failed the session. A chunk that does not follow the
    stream's last one now answers `session_not_held`, which makes the driver restore the stream
    here from the snapshot; the copy itself is left as it was."""
    decode = DecodeStage(settings)
    c = load_components("tiny", device="cpu")
    chunks = list(HiStreamGenerator(c.dit, c.preset, "histream").generate(
        c.text.encode(["a fox"]), H, W, 33, seed=0))  # fmt: skip

    def latents(i: int) -> stages_pb2.ChunkLatents:
        return stages_pb2.ChunkLatents(
            session_id="s", chunk_index=i, latents=to_proto(chunks[i].latents)
        )

    async def run() -> None:
        await decode.OpenStream(video_stream("s", "video_s"))
        await decode.DecodeChunk(latents(0))
        with pytest.raises(SessionNotHeld, match=r"1 chunk\(s\) decoded, not the state chunk 2"):
            await decode.DecodeChunk(latents(2))
        with pytest.raises(SessionNotHeld, match="stale copy"):
            await decode.DecodeChunk(latents(0))  # a repeat is not decoded twice either
        assert (await decode.DecodeChunk(latents(1))).first_frame == 9  # in order: goes on

    asyncio.run(run())
