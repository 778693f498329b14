"""The session mailbox without Ray: letters reach the owner of a session and its answer the
sender; unknown sessions, other tenants, stale registrations, silent owners."""

from __future__ import annotations

import asyncio

import pytest

from services.control import Mailbox
from services.control import mailbox as mailbox_module
from services.errors import InvalidArgument, NotFound, Unavailable
from tests.services.harness import FakeClock, run


async def owner_loop(box: Mailbox, owner: str, sessions: dict, answers: dict, seq: int = 10):
    """An owner that answers each letter with `answers[op]` (an exception is raised)."""
    while True:
        seq += 1
        for letter in await box.collect(owner, seq, sessions, wait_s=0.05):
            answer = answers[letter["op"]]
            if isinstance(answer, Exception):
                await box.answer(letter["id"], error=answer)
            else:
                await box.answer(letter["id"], {"args": letter["args"], "answer": answer})


def test_a_letter_reaches_the_owner_of_the_session_and_its_answer_the_sender():
    box = Mailbox()

    async def go():
        a = asyncio.create_task(owner_loop(box, "a", {"s1": "alpha"}, {"update_prompt": [2, 5]}))
        b = asyncio.create_task(owner_loop(box, "b", {"s2": "alpha"}, {"update_prompt": [9, 9]}))
        await asyncio.sleep(0.01)
        try:
            answer = await box.send("s1", "alpha", "update_prompt", {"prompt": "a cat"})
            return answer, (await box.stats())["answered"]
        finally:
            a.cancel(), b.cancel()

    assert run(go()) == ({"args": {"prompt": "a cat"}, "answer": [2, 5]}, 1)


def test_the_owners_error_reaches_the_sender_as_itself():
    box = Mailbox()

    async def go():
        answers = {"close": InvalidArgument("the session is ended", "prompt")}
        owner = asyncio.create_task(owner_loop(box, "a", {"s1": "alpha"}, answers))
        await asyncio.sleep(0.01)
        try:
            await box.send("s1", "alpha", "close", {})
        finally:
            owner.cancel()

    with pytest.raises(InvalidArgument, match="the session is ended"):
        run(go())


@pytest.mark.parametrize("session, tenant", [("s9", "alpha"), ("s1", "bravo")])
def test_an_unknown_session_or_another_tenants_is_not_found_alike(session, tenant):
    box = Mailbox()

    async def go():
        await box.register("a", 1, "s1", "alpha")
        await box.send(session, tenant, "close", {})

    with pytest.raises(NotFound) as err:
        run(go())
    assert str(err.value) == f"no running session with id {session!r}"


def test_a_stale_poll_does_not_undo_a_later_registration_and_a_fresh_one_resyncs():
    box = Mailbox()

    async def go():
        await box.register("a", 5, "s1", "alpha")
        await box.collect("a", 4, {}, wait_s=0)  # listed before s1 opened: ignored
        before = (await box.stats())["owners"]
        await box.release("a", 6, "s1")
        await box.collect("a", 3, {"s1": "alpha"}, wait_s=0)  # stale again
        after_release = (await box.stats())["owners"]
        restarted = Mailbox()  # a mailbox that lost everything learns it on the next poll
        await restarted.collect("a", 7, {"s2": "alpha", "s3": "alpha"}, wait_s=0)
        return before, after_release, (await restarted.stats())["owners"]

    assert run(go()) == ({"a": 1}, {"a": 0}, {"a": 2})


def test_a_sender_that_gave_up_gets_unavailable_and_the_owner_never_sees_the_letter():
    box = Mailbox(answer_s=0.05)

    async def go():
        await box.register("a", 1, "s1", "alpha")
        with pytest.raises(Unavailable, match="did not answer within 0 s"):
            await box.send("s1", "alpha", "close", {})
        return await box.collect("a", 2, {"s1": "alpha"}, wait_s=0.01)

    assert run(go()) == []


def test_letters_to_an_owner_gone_silent_answer_unavailable(monkeypatch):
    clock = FakeClock().install(monkeypatch, mailbox_module)
    box = Mailbox(answer_s=30, owner_ttl_s=15)

    async def go():
        await box.register("a", 1, "s1", "alpha")
        sending = asyncio.create_task(box.send("s1", "alpha", "close", {}))
        await asyncio.sleep(0.01)
        clock.now = 16.0  # "a" has not polled for 16 s: forgotten on the next call
        await box.collect("b", 1, {"s2": "alpha"}, wait_s=0)  # any poll forgets the silent
        with pytest.raises(Unavailable, match="driving session 's1' is gone"):
            await sending
        return (await box.stats())["owners"]

    assert run(go()) == {"b": 1}


def test_the_stated_timings_gone_after_3_s_without_a_poll_and_a_poll_every_5_s(monkeypatch):
    """README, *Control from any gateway replica*: an owner that has not polled for 3 s is
    taken for gone (2.9 s is not); a poll without letters returns after 5 s, so a restarted
    mailbox has every live owner's sessions back within 5 s."""
    import inspect

    from services.gateway import control

    clock = FakeClock().install(monkeypatch, mailbox_module)
    assert inspect.signature(Mailbox.collect).parameters["wait_s"].default == 5.0
    polls = inspect.signature(control.SessionControl).parameters["poll_s"].default
    assert polls == 5.0  # what the gateway's replicas wait in each poll

    async def silent_for(seconds: float) -> dict:
        box = Mailbox()
        await box.collect("a", 1, {"s1": "alpha"}, wait_s=0)
        clock.now += seconds
        await box.collect("b", 1, {}, wait_s=0)  # any poll forgets the silent
        return (await box.stats())["owners"]

    assert run(silent_for(2.9)) == {"a": 1, "b": 0}
    assert run(silent_for(3.1)) == {"b": 0}
