"""The session mailbox: how a control call (a prompt update, a close, a resume's hand-over)
that lands on one gateway replica reaches the replica that drives the session.

A Serve deployment of one replica, pure asyncio. Each gateway replica ("owner") registers
the sessions it drives and long-polls `collect` for letters addressed to them; any replica
`send`s a letter to a session and awaits the owner's `answer`. The owner checks the session's
token and tenant itself; the mailbox only routes (an unknown session, or one of another
tenant, answers exactly as the owner would: not found).

Registrations are kept right however calls interleave: every call of an owner carries a
number it increments (`seq`); `collect` also carries the owner's full list of sessions, which
replaces what the mailbox holds for it unless a later register or release already arrived.
So a mailbox that restarted (and forgot everything) is whole again after each owner's next
poll, and an owner that stops polling for `owner_ttl_s` (a replica that died) is forgotten:
letters to it answer `Unavailable` within seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from services.errors import NotFound, ServiceError, Unavailable
from services.protocol.claims import Claims

POLL_S = 5.0  # an owner's collect returns after this long without letters
ANSWER_S = 60.0  # a sender waits this long for the owner's answer
# A live owner polls again as soon as a poll returns: one with no poll in flight for this long
# is gone (its replica died or stopped), and letters to it answer Unavailable at once.
OWNER_TTL_S = 3.0
CHECK_S = 1.0  # how often a waiting sender looks for that


@dataclass
class Letter:
    """One control call to a session: `op` is the owner's method name, `args` its arguments."""

    id: int
    session_id: str
    tenant: str
    op: str
    args: dict = field(default_factory=dict)


@dataclass
class _Owner:
    seq: int = -1  # the last register/release applied
    sessions: dict[str, str] = field(default_factory=dict)  # session id -> tenant
    inbox: asyncio.Queue[Letter] = field(default_factory=asyncio.Queue)
    polling: int = 0  # collects in flight
    seen: float = field(default_factory=time.monotonic)


def not_found(session_id: str) -> NotFound:
    return NotFound(f"no running session with id {session_id!r}", param="session_id")


class Mailbox:
    def __init__(self, answer_s: float = ANSWER_S, owner_ttl_s: float = OWNER_TTL_S) -> None:
        self.answer_s = answer_s
        self.owner_ttl_s = owner_ttl_s
        self._owners: dict[str, _Owner] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._answered = 0
        self._claims = Claims()

    def _owner(self, owner: str) -> _Owner:
        if owner not in self._owners:
            self._owners[owner] = _Owner()
        entry = self._owners[owner]
        entry.seen = time.monotonic()
        return entry

    async def register(self, owner: str, seq: int, session_id: str, tenant: str) -> None:
        entry = self._owner(owner)
        entry.seq = max(entry.seq, seq)
        entry.sessions[session_id] = tenant

    async def release(self, owner: str, seq: int, session_id: str) -> None:
        entry = self._owner(owner)
        entry.seq = max(entry.seq, seq)
        entry.sessions.pop(session_id, None)

    async def claim(self, session_id: str, claimant: str, ttl_s: float) -> bool:
        """The lease on resuming `session_id` for `claimant` (one resume attempt), unless
        another resume holds it (see services/protocol/claims.py)."""
        return self._claims.take(session_id, claimant, ttl_s)

    async def unclaim(self, session_id: str, claimant: str) -> None:
        self._claims.give_back(session_id, claimant)

    async def collect(
        self, owner: str, seq: int, sessions: dict[str, str], wait_s: float = POLL_S
    ) -> list[dict]:
        """The letters for `owner`'s sessions (as dicts: id, session_id, tenant, op, args),
        waiting up to `wait_s` for the first; `sessions` (all it drives, as of `seq`) replaces
        what is registered unless it is stale. Letters whose sender stopped waiting are
        dropped: nothing acts on a call its caller was told failed."""
        entry = self._owner(owner)
        if seq > entry.seq:
            entry.seq, entry.sessions = seq, dict(sessions)
        self._forget_silent()
        entry.polling += 1
        try:
            letters = [await asyncio.wait_for(entry.inbox.get(), wait_s)]
        except TimeoutError:
            return []
        finally:
            entry.polling -= 1
            entry.seen = time.monotonic()
        while not entry.inbox.empty():
            letters.append(entry.inbox.get_nowait())
        return [vars(letter) for letter in letters if letter.id in self._waiting]

    async def send(self, session_id: str, tenant: str, op: str, args: dict) -> object:
        """Deliver a control call to the owner of `tenant`'s session and return its answer
        (or raise the error it answered)."""
        self._forget_silent()
        owner = self._owner_of(session_id, tenant)
        if owner is None:
            raise not_found(session_id)
        letter = Letter(next(self._ids), session_id, tenant, op, args)
        answered = asyncio.get_running_loop().create_future()
        self._waiting[letter.id] = answered
        owner.inbox.put_nowait(letter)
        deadline = time.monotonic() + self.answer_s
        try:
            while True:
                try:  # each second: is the owner gone (it answers Unavailable then)?
                    return await asyncio.wait_for(asyncio.shield(answered), CHECK_S)
                except TimeoutError:
                    self._forget_silent()
                    if answered.done():
                        continue
                    if time.monotonic() >= deadline:
                        raise Unavailable(
                            f"the gateway replica driving session {session_id!r} did not "
                            f"answer within {self.answer_s:.0f} s; retry, or resume the session"
                        ) from None
        finally:
            self._waiting.pop(letter.id, None)

    async def answer(
        self, letter_id: int, result: object = None, error: ServiceError | None = None
    ) -> None:
        """The owner's answer to a letter (dropped if its sender stopped waiting)."""
        self._settle(letter_id, result, error)

    def _settle(self, letter_id: int, result: object, error: ServiceError | None) -> None:
        answered = self._waiting.get(letter_id)
        if answered is None or answered.done():
            return
        self._answered += 1
        if error is not None:
            answered.set_exception(error)
        else:
            answered.set_result(result)

    async def stats(self) -> dict:
        """Each known owner's number of registered sessions, and the letters answered so far
        (for tests and operators)."""
        owners = {name: len(entry.sessions) for name, entry in self._owners.items()}
        return {"owners": owners, "answered": self._answered, "resuming": len(self._claims)}

    def _owner_of(self, session_id: str, tenant: str) -> _Owner | None:
        for entry in self._owners.values():
            if entry.sessions.get(session_id) == tenant:
                return entry
        return None

    def _forget_silent(self) -> None:
        now = time.monotonic()
        for name, entry in list(self._owners.items()):
            if entry.polling == 0 and now - entry.seen > self.owner_ttl_s:
                del self._owners[name]
                while not entry.inbox.empty():
                    letter = entry.inbox.get_nowait()
                    self._settle(letter.id, None, Unavailable(
                        f"the gateway replica driving session {letter.session_id!r} is gone; "
                        "resume the session"
                    ))  # fmt: skip
