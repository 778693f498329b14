"""Control calls by session id from another gateway replica, without Ray: two replicas'
`SessionControl`s meet at one `Mailbox` (through in-process handles); the session runs on
fake stages on replica A, the calls arrive at replica B."""

from __future__ import annotations

import asyncio

import pytest

from services.control import Mailbox
from services.errors import InvalidArgument, NotFound
from services.gateway.control import SessionControl
from services.protocol import ChunkReady, EndReason, SessionEnded
from services.sessions import SessionRegistry
from tests.services.fakes import LocalHandle, fake_stages
from tests.services.harness import run
from tests.services.sessions.test_live import live_session

TENANT = "default"  # session_plan's tenant


def replicas():
    box = LocalHandle(Mailbox())
    a = SessionControl(SessionRegistry(), box, poll_s=0.05)
    b = SessionControl(SessionRegistry(), box, poll_s=0.05)
    return a, b


async def running_on(control: SessionControl, stages, gate):
    """A session on `control`'s replica, generating until chunk 1 (which waits on `gate`);
    returns it and the task collecting its events."""
    live = live_session(stages, frames=69)
    control.sessions.add(live)
    control.opened(live.id, TENANT)
    events: list = []

    async def consume():
        try:
            async for event in live.events(deadline_s=60):
                events.append(event)
        finally:
            control.sessions.remove(live.id)
            control.ended(live.id)

    task = asyncio.create_task(consume())
    await stages.journal.reached("RunPhase", stage="structure", chunk=1)
    return live, task, events


def test_a_prompt_update_and_a_close_from_another_replica_reach_the_session():
    stages = fake_stages()
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    a, b = replicas()

    async def go():
        live, task, events = await running_on(a, stages, gate)
        update = asyncio.create_task(b.update_prompt(live.id, live.token, TENANT, "a heron"))
        await stages.journal.until(lambda: live.driver.prompts.issued == 1)  # reached A
        gate.set()  # the prompt applies at the next chunk boundary, and then is answered
        update = await update
        await b.close(live.id, live.token, TENANT)
        await task
        a.stop(), b.stop()
        return update, events, live

    (version, start), events, live = run(go())
    assert (version, start) == (1, 2)  # chunk 1 had begun: the prompt applies from chunk 2
    assert live.driver.prompts.current == 1 and live.stop_reason == EndReason.CLOSED
    assert events[-1] == SessionEnded(EndReason.CLOSED)
    assert max(e.index for e in events if isinstance(e, ChunkReady)) < 5  # stopped early


@pytest.mark.parametrize("who", ["wrong token", "other tenant", "unknown id"])
def test_another_replica_answers_not_found_alike_for_what_the_caller_may_not_touch(who):
    stages = fake_stages()
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    a, b = replicas()

    async def go():
        live, task, _ = await running_on(a, stages, gate)
        session_id, token, tenant = {
            "wrong token": (live.id, "guess", TENANT),
            "other tenant": (live.id, live.token, "bravo"),
            "unknown id": ("sess_nope", live.token, TENANT),
        }[who]
        try:
            with pytest.raises(NotFound, match=f"no running session with id '{session_id}'"):
                await b.update_prompt(session_id, token, tenant, "a heron")
            with pytest.raises(NotFound):
                await b.close(session_id, token, tenant)
            return live.driver.prompts.current, live.stop_reason
        finally:
            gate.set()
            await task
            a.stop(), b.stop()

    assert run(go()) == (0, None)  # untouched


def test_a_missing_token_is_the_callers_mistake_wherever_the_session_runs():
    _, b = replicas()
    with pytest.raises(InvalidArgument, match="session_token is required"):
        run(b.close("sess_1", "", TENANT))


def test_a_resume_elsewhere_takes_the_session_from_its_old_connection():
    """The hand-over a resume on B asks of A: the old connection stops (suspended, resumable)
    and B's call returns once A has let go of the session."""
    stages = fake_stages()
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    a, b = replicas()

    async def go():
        live, task, _ = await running_on(a, stages, gate)
        hand_over = asyncio.create_task(b.hand_over(live.id, live.token, TENANT))
        while live.stop_reason is None:  # the letter reaches A
            await asyncio.sleep(0.01)
        gate.set()  # the chunk under way finishes (it is kept for the resume), then A lets go
        await hand_over
        held_after = a.sessions.holds(live.id)
        await task
        await b.hand_over("sess_gone", "any", TENANT)  # nobody drives it: nothing to do
        a.stop(), b.stop()
        return held_after, live.stop_reason

    assert run(go()) == (False, EndReason.DISCONNECTED)
