"""Resume leases (services/protocol/claims.py): one claimant per session at a time, its own
to renew and give back, gone on their own after their time; the mailbox holds them for every
gateway replica."""

from __future__ import annotations

import pytest

from services.control import Mailbox
from services.errors import QueueTimeout
from services.gateway import control as module
from services.gateway.control import SessionControl
from services.protocol.claims import Claims
from services.sessions import SessionRegistry
from tests.services.harness import run


def test_a_lease_is_held_by_one_claimant_until_given_back_or_expired():
    now = [0.0]
    claims = Claims(clock=lambda: now[0])
    assert claims.take("s1", "a", 30.0)
    assert not claims.take("s1", "b", 30.0)  # held by a
    assert claims.take("s2", "b", 30.0)  # another session: its own lease
    assert claims.take("s1", "a", 30.0)  # a renews its own
    claims.give_back("s1", "b")  # not b's to give back
    assert not claims.take("s1", "b", 30.0)
    claims.give_back("s1", "a")
    assert claims.take("s1", "b", 30.0)
    now[0] = 31.0  # b's replica died mid-resume: its leases go on their own
    assert len(claims) == 0
    assert claims.take("s1", "c", 30.0) and claims.take("s2", "c", 30.0)


def test_the_mailbox_holds_resume_leases_for_every_replica():
    box = Mailbox()

    async def go():
        first = await box.claim("sess_1", "resume-a", 30.0)
        second = await box.claim("sess_1", "resume-b", 30.0)
        during = (await box.stats())["resuming"]
        await box.unclaim("sess_1", "resume-a")
        return first, second, during, await box.claim("sess_1", "resume-b", 30.0)

    assert run(go()) == (True, False, 1, True)


def test_a_resume_waits_for_anothers_lease_then_times_out_naming_the_session(monkeypatch):
    monkeypatch.setattr(module, "RESUME_WAIT_S", 0.2)
    control = SessionControl(SessionRegistry())  # one replica: its own leases

    async def go():
        async with control.resuming("sess_1"):
            with pytest.raises(QueueTimeout, match="another resume of session 'sess_1'"):
                async with control.resuming("sess_1"):
                    pass
        async with control.resuming("sess_1"):  # given back: the next one goes at once
            return True

    assert run(go())
