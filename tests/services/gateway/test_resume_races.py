"""Resumes of one session racing (a client retrying while its first resume is still taking the
session up), on one gateway replica or on two that share the session mailbox, without Ray:
they go one after the other, the later taking the session over from the earlier, as if they
had come in turn. Never two drivers under one id: exactly one connection delivers the rest of
the session, every chunk once, and the stages hold nothing afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from protos.histream.v1 import api_pb2
from services.control import Mailbox
from services.errors import Unavailable
from services.gateway.core import GatewayCore
from services.storage import Layout, LocalStorage
from tests.services.fakes import LocalHandle, real_stages
from tests.services.gateway.local_app import LocalGateway, settings_for
from tests.services.gateway.test_grpc_calls import Context


async def collect(events) -> list:
    return [event async for event in events]


def resume_of(started: api_pb2.SessionStarted) -> api_pb2.ResumeSessionRequest:
    """The client's resume after chunk 1."""
    return api_pb2.ResumeSessionRequest(
        session_id=started.session_id, session_token=started.session_token, last_chunk=1
    )


@contextlib.asynccontextmanager
async def one_gateway(tmp_path, stages) -> AsyncIterator[LocalGateway]:
    """A gateway replica over `stages`, its background work running; drained on the way out."""
    core = GatewayCore(settings_for(tmp_path), stages.handles)
    core.start_background()
    try:
        yield LocalGateway(core)
    finally:
        await core.drain(timeout_s=5)


async def interrupted_session(gateway: LocalGateway) -> api_pb2.SessionStarted:
    """A 5-chunk session whose client goes away after chunk 1."""
    request = api_pb2.StreamSessionRequest(prompt="a cat", size="128x64", num_frames=57)
    started = None
    async for event in gateway.StreamSession(request, Context()):
        if event.WhichOneof("event") == "started":
            started = event.started
        if event.WhichOneof("event") == "chunk" and event.chunk.index == 1:
            break
    assert started is not None
    return started


@pytest.mark.parametrize("replicas", [1, 2])
def test_two_resumes_racing_take_the_session_up_one_after_the_other(tmp_path, replicas):
    stages = real_stages(tmp_path)
    mailbox = LocalHandle(Mailbox(), detached=True) if replicas == 2 else None
    settings = settings_for(tmp_path)

    async def go():
        cores = [GatewayCore(settings, stages.handles, mailbox) for _ in range(replicas)]
        for core in cores:
            core.start_background()
        gateways = [LocalGateway(core) for core in cores]
        try:
            started = await interrupted_session(gateways[0])
            resume = resume_of(started)

            async def take_up(gateway: LocalGateway) -> list:
                return [e async for e in gateway.ResumeSession(resume, Context())]

            both = await asyncio.wait_for(
                asyncio.gather(take_up(gateways[0]), take_up(gateways[-1])), 120
            )
            held = stages.held()
            return started, both, held
        finally:
            for core in cores:
                await core.drain(timeout_s=5)

    started, both, held = asyncio.run(go())
    ended = [
        [e.ended.reason for e in events if e.WhichOneof("event") == "ended"] for events in both
    ]
    assert sorted(ended) == [[], ["completed"]], ended  # the earlier stops as a dropped one does
    done, taken = (both[0], both[1]) if ended[0] else (both[1], both[0])
    for events in both:  # a resume of the same session, if it started before it was taken over
        assert all(e.started.resumed for e in events if e.WhichOneof("event") == "started")
        assert all(
            e.started.session_id == started.session_id
            for e in events
            if e.WhichOneof("event") == "started"
        )
    # the later resume goes on from its own last_chunk (1): chunks 2..4, each once, whatever
    # the earlier delivered before it was taken over
    assert [e.chunk.index for e in done if e.WhichOneof("event") == "chunk"] == [2, 3, 4]
    assert all(e.chunk.index in (2, 3, 4) for e in taken if e.WhichOneof("event") == "chunk")
    assert held == {"structure": 0, "refine": 0, "decode": 0}


def test_a_resume_whose_client_goes_away_while_it_still_opens_leaves_the_session_resumable(
    tmp_path,
):
    """A client that drops again while its resume is still taking the session up (here: a
    stage's restore held) leaves the session as its snapshot stood: resumable, its playlist
    open, not ended and lost."""
    stages = real_stages(tmp_path)
    storage, layout = LocalStorage(tmp_path), Layout()

    async def go():
        async with one_gateway(tmp_path, stages) as gateway:
            started = await interrupted_session(gateway)
            resume = resume_of(started)
            gate = stages.structure.gate("RestoreSession")
            first = asyncio.create_task(collect(gateway.ResumeSession(resume, Context())))
            await stages.journal.reached("RestoreSession", stage="structure")
            first.cancel()  # the client is gone again while its resume still opens
            with contextlib.suppress(asyncio.CancelledError):
                await first
            gate.set()
            await asyncio.sleep(0.1)  # what the first resume left behind is settled
            playlist = storage.get(layout.session_playlist_key(started.session_id)).decode()
            again = await asyncio.wait_for(collect(gateway.ResumeSession(resume, Context())), 60)
            return playlist, again, stages.held()

    playlist, again, held = asyncio.run(go())
    assert "#EXT-X-ENDLIST" not in playlist
    assert again[0].started.resumed and again[-1].ended.reason == "completed"
    assert [e.chunk.index for e in again if e.WhichOneof("event") == "chunk"] == [2, 3, 4]
    assert held == {"structure": 0, "refine": 0, "decode": 0}


def test_a_drain_while_a_resume_still_opens_leaves_the_session_resumable(tmp_path):
    """A replica shutting down (a scale-down, a rolling update) while a resume on it is still
    taking the session up suspends the session as its snapshot stood: a resume on another
    replica goes on from it."""
    stages = real_stages(tmp_path)
    storage, layout = LocalStorage(tmp_path), Layout()

    async def go():
        leaving, staying = (GatewayCore(settings_for(tmp_path), stages.handles) for _ in "ab")
        leaving.start_background()
        staying.start_background()
        try:
            started = await interrupted_session(LocalGateway(leaving))
            resume = resume_of(started)
            gate = stages.structure.gate("RestoreSession")
            cut = asyncio.create_task(
                collect(LocalGateway(leaving).ResumeSession(resume, Context()))
            )
            await stages.journal.reached("RestoreSession", stage="structure")
            await leaving.drain(timeout_s=10)
            gate.set()
            cut = await cut
            playlist = storage.get(layout.session_playlist_key(started.session_id)).decode()
            again = LocalGateway(staying).ResumeSession(resume, Context())
            again = await asyncio.wait_for(collect(again), 60)
            return cut, playlist, again, stages.held()
        finally:
            await staying.drain(timeout_s=5)

    cut, playlist, again, held = asyncio.run(go())
    assert not [e for e in cut if e.WhichOneof("event") == "chunk"]  # it never took the session up
    assert "#EXT-X-ENDLIST" not in playlist
    assert again[0].started.resumed and again[-1].ended.reason == "completed"
    assert [e.chunk.index for e in again if e.WhichOneof("event") == "chunk"] == [2, 3, 4]
    assert held == {"structure": 0, "refine": 0, "decode": 0}


def test_a_resume_that_fails_to_take_the_session_up_leaves_it_resumable(tmp_path):
    """A stage failing a resume's restore (a replica restarting) fails that resume, with the
    error, and only that: the session stays as its snapshot stood, and the client's next
    resume goes on from it."""
    stages = real_stages(tmp_path)

    async def go():
        async with one_gateway(tmp_path, stages) as gateway:
            started = await interrupted_session(gateway)
            resume = resume_of(started)
            restarting = Unavailable("the structure stage's replica is restarting")
            stages.structure.fail("RestoreSession", lambda: restarting, times=1)
            context = Context()
            with pytest.raises(Unavailable, match="restarting"):
                await collect(gateway.ResumeSession(resume, context))
            again = await asyncio.wait_for(collect(gateway.ResumeSession(resume, Context())), 60)
            return context.code, again, stages.held()

    code, again, held = asyncio.run(go())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert again[0].started.resumed and again[-1].ended.reason == "completed"
    assert [e.chunk.index for e in again if e.WhichOneof("event") == "chunk"] == [2, 3, 4]
    assert held == {"structure": 0, "refine": 0, "decode": 0}
