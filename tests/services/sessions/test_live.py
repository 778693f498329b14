"""Streaming sessions' events without Ray: fake stages for the stop requests and prompt events,
the real stages for a sealed HLS playlist; the registry."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import AtCapacity, InvalidArgument, NotFound
from services.protocol import (
    ChunkReady,
    EndReason,
    InitSegment,
    PromptApplied,
    SessionEnded,
    SessionQueued,
    SessionStarted,
    SessionStatus,
    StreamKind,
)
from services.sessions import LiveSession, SessionDriver, SessionRegistry
from services.sessions import driver as driver_module
from services.sessions.restore import Durability
from tests.services.fakes import fake_stages, real_stages
from tests.services.harness import FakeClock, run, session_plan, watch_prompts

PLAYLIST = "tenants/default/sessions/sess_1/playlist.m3u8"
NOTHING_HELD = {"structure": 0, "refine": 0, "decode": 0}


def live_session(stages, frames: int = 33, settle_s: float = 30.0) -> LiveSession:
    plan = session_plan(kind=StreamKind.SESSION, frames=frames, object_id="sess_1")
    driver = SessionDriver(stages.handles, plan, Durability(settle_s=settle_s))
    watch_prompts(driver, stages.journal)
    return LiveSession("sess_1", driver, playlist_key=PLAYLIST)


def summary(events) -> list[tuple]:
    out = []
    for e in events:
        if isinstance(e, ChunkReady):
            out.append(("chunk", e.index, e.prompt_version))
        elif isinstance(e, PromptApplied):
            out.append(("prompt", e.prompt_version, e.from_chunk))
        elif isinstance(e, SessionEnded):
            out.append(("ended", e.reason))
        else:
            out.append((type(e).__name__,))
    return out


def test_a_completed_session_announces_each_prompt_before_its_first_chunk():
    stages = fake_stages()
    journal = stages.journal
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 0)
    live = live_session(stages)
    events: list = []

    async def go():
        async def consume():
            async for event in live.events(deadline_s=60):
                events.append(event)

        consumer = asyncio.create_task(consume())
        await journal.reached("RunPhase", stage="structure", chunk=0)
        update = asyncio.create_task(live.driver.update_prompt("a dog"))
        await journal.until(lambda: live.driver.prompts.issued == 1)
        gate.set()
        await consumer
        return await update

    assert run(go()) == (1, 1)
    assert summary(events) == [
        ("SessionStarted",), ("InitSegment",), ("chunk", 0, 0), ("prompt", 1, 1),
        ("chunk", 1, 1), ("chunk", 2, 1), ("ended", EndReason.COMPLETED),
    ]  # fmt: skip
    started, init = events[0], events[1]
    assert started == SessionStarted(
        "sess_1", 96, 64, 16, 3, 33, PLAYLIST, live.token, mode="histream+"
    )
    assert init == InitSegment(b"init")
    assert [e.media for e in events if isinstance(e, ChunkReady)][1] == b"seg:1/1/a dog"
    assert len(stages.handles.decode.called("FinishStream")) == 1
    assert live.driver.status == SessionStatus.ENDED and stages.held() == NOTHING_HELD


@pytest.mark.parametrize("reason", [EndReason.CLOSED, EndReason.DISCONNECTED])
def test_a_stop_request_mid_stream(reason):
    stages = fake_stages()
    journal = stages.journal
    stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 2)
    # the gated chunk never finishes: a disconnect's settle (finish the chunks started) gives
    # up on it after settle_s, then cancels it
    live = live_session(stages, settle_s=0.5)
    events: list = []

    async def go():
        async for event in live.events(deadline_s=60):
            events.append(event)
            if isinstance(event, ChunkReady) and event.index == 1:
                await journal.reached("RunPhase", stage="structure", chunk=2)
                live.request_stop(reason)

    run(go())
    assert journal.find("RunPhase", what="cancel", chunk=2)  # generation stopped at once
    sid = live.driver.session_id
    finished = stages.handles.decode.called("FinishStream")
    if reason == EndReason.CLOSED:  # what was generated is sealed: the playlist ends
        assert summary(events)[2:] == [("chunk", 0, 0), ("chunk", 1, 0), ("ended", reason)]
        assert [r.session_id for (r,) in finished] == [sid]
        assert not stages.handles.decode.called("CloseStream")
        assert live.driver.status == SessionStatus.ENDED
    else:  # the client went away: nothing more is sent, nothing sealed
        assert summary(events)[2:] == [("chunk", 0, 0), ("chunk", 1, 0)]
        assert finished == []
        assert [r.session_id for (r,) in stages.handles.decode.called("CloseStream")] == [sid]
        assert live.driver.status == SessionStatus.CLOSED
    assert (live.stop_reason, live.driver.end_reason) == (reason, reason)
    assert stages.held() == NOTHING_HELD


def test_disconnect_overrides_an_earlier_close_request():
    live = live_session(fake_stages())
    live.request_stop(EndReason.CLOSED)
    live.request_stop(EndReason.DISCONNECTED)
    live.request_stop(EndReason.CLOSED)
    assert live.stop_reason == EndReason.DISCONNECTED


def test_a_session_that_never_gets_capacity_fails_closed(monkeypatch):
    clock = FakeClock().install(monkeypatch, driver_module)
    stages = fake_stages()
    stages.refine.fail("OpenSession", lambda: AtCapacity("refine stage full"))
    live = live_session(stages)
    events: list = []

    async def go():
        with pytest.raises(AtCapacity, match="refine stage full"):
            async for event in live.events(deadline_s=0.1):
                events.append(event)

    run(go())
    # it was told once that it waits, first in line, and nothing more
    assert events == [SessionQueued(position=1)] and clock.sleeps == [0.05, 0.1]
    assert (live.driver.status, live.driver.end_reason) == (SessionStatus.FAILED, EndReason.FAILED)
    assert stages.held() == NOTHING_HELD


def test_a_real_session_stores_its_segments_and_a_sealed_playlist(tmp_path):
    store = tmp_path / "store"
    stages = real_stages(store)
    live = live_session(stages, frames=21)

    async def go():
        return [event async for event in live.events(deadline_s=60)]

    events = run(go())
    assert summary(events)[2:] == [("chunk", 0, 0), ("chunk", 1, 0), ("ended", "completed")]
    prefix = "tenants/default/sessions/sess_1/"
    chunks = [e for e in events if isinstance(e, ChunkReady)]
    assert [c.object_key for c in chunks] == [prefix + "seg-00001.m4s", prefix + "seg-00002.m4s"]
    for c in chunks:
        assert (store / c.object_key).read_bytes() == c.media
    assert (store / prefix / "init.mp4").read_bytes() == events[1].media
    playlist = (store / PLAYLIST).read_text()
    assert playlist.count("#EXTINF:") == 2 and playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert stages.held() == NOTHING_HELD


def test_the_registry_finds_live_sessions_by_id_and_token():
    registry = SessionRegistry()
    live = live_session(fake_stages())
    registry.add(live)
    assert registry.get("sess_1", live.token) is live and len(registry) == 1
    assert len(live.token) >= 32 and live.token != live_session(fake_stages()).token
    # a wrong token answers exactly as an unknown id; a missing one is the client's mistake
    with pytest.raises(NotFound, match="no running session with id 'sess_1'"):
        registry.get("sess_1", "guess")
    with pytest.raises(InvalidArgument, match="session_token is required") as err:
        registry.get("sess_1", "")
    assert err.value.param == "session_token"
    registry.remove("sess_1")
    registry.remove("sess_1")  # removing twice is fine
    with pytest.raises(NotFound, match="no running session with id 'sess_1'") as err:
        registry.get("sess_1", live.token)
    assert err.value.param == "session_id" and len(registry) == 0


def test_waiting_sessions_are_told_their_place_in_line(monkeypatch):
    """Two sessions wait for capacity: each is told its place once, and the second moves up
    when the first gets in."""
    clock = FakeClock().install(monkeypatch, driver_module)
    stages = fake_stages()
    full = {"sess_a": True, "sess_b": True}
    stages.refine.fail(
        "OpenSession",
        lambda: AtCapacity("refine stage full"),
        when=lambda r: full[r.spec.session_id.split(".")[0]],
    )
    registry = SessionRegistry()
    lives = {}
    for sid in full:
        plan = session_plan(kind=StreamKind.SESSION, frames=9, object_id=sid)
        lives[sid] = LiveSession(sid, SessionDriver(stages.handles, plan), playlist_key=PLAYLIST)
        registry.add(lives[sid])
    seen: dict[str, list] = {sid: [] for sid in full}

    async def consume(sid: str) -> None:
        async for event in lives[sid].events(deadline_s=60):
            seen[sid].append(event)
            if isinstance(event, SessionQueued) and sid == "sess_b" and event.position == 2:
                full["sess_a"] = False  # capacity frees up for the first in line

    async def go():
        b = asyncio.create_task(consume("sess_b"))
        a = asyncio.create_task(consume("sess_a"))
        await a
        full["sess_b"] = False
        await b

    run(go())
    queued = {sid: [e.position for e in seen[sid] if isinstance(e, SessionQueued)] for sid in full}
    assert queued == {"sess_a": [1], "sess_b": [2, 1]}
    assert all(isinstance(seen[sid][-1], SessionEnded) for sid in full)
    assert clock.sleeps  # they waited (on the fake clock)


@pytest.mark.parametrize("reason", [EndReason.CLOSED, EndReason.DISCONNECTED])
def test_a_stop_while_waiting_for_capacity_ends_the_wait(monkeypatch, reason):
    FakeClock().install(monkeypatch, driver_module)
    stages = fake_stages()
    stages.refine.fail("OpenSession", lambda: AtCapacity("refine stage full"))
    live = live_session(stages)
    events: list = []

    async def go():
        async for event in live.events(deadline_s=3600):
            events.append(event)
            if isinstance(event, SessionQueued):
                live.request_stop(reason)

    run(go())
    ended = [SessionEnded(EndReason.CLOSED)] if reason == EndReason.CLOSED else []
    assert events == [SessionQueued(position=1), *ended]
    assert live.driver.status == SessionStatus.CLOSED and stages.held() == NOTHING_HELD
    assert not stages.handles.decode.called("FinishStream")
