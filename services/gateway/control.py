"""Control calls on a session by id (a prompt update, a close, a resume's hand-over), from
whichever gateway replica a client's call lands on.

A call for a session this replica drives is carried out here. Any other goes through the
session mailbox (`services/control/mailbox.py`, a deployment of one replica) to the replica
that drives it, which carries it out and answers. So with several gateway replicas behind one
address, `UpdateSessionPrompt` and `CloseSession` work wherever they land. Each replica
registers the sessions it drives with the mailbox and long-polls it for letters.

Without a mailbox (tests of one replica in-process), only this replica's sessions are found.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from services.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    QueueTimeout,
    ServiceError,
    Unavailable,
    remote_result,
)
from services.logs import ids
from services.protocol import EndReason
from services.protocol.claims import Claims
from services.protocol.routing import own_request_id
from services.sessions import SessionRegistry
from services.sessions.prompts import PromptUpdate

log = logging.getLogger("histream.gateway")

POLL_S = 5.0  # a collect returns after this long without letters (then registers afresh)
HAND_OVER_S = 10.0  # a resume waits this long for the session's old connection to let go
# A resume holds the lease on its session while it takes it up (its hand-over, the snapshot
# read, its registration); another resume of the session waits this long for it, then goes on
# and takes the session over from it, as a resume after the first one ended would.
RESUME_LEASE_S = HAND_OVER_S + 20.0
RESUME_WAIT_S = RESUME_LEASE_S + 5.0
OPS = ("update_prompt", "close", "hand_over")


class SessionControl:
    def __init__(self, sessions: SessionRegistry, mailbox=None, poll_s: float = POLL_S) -> None:
        self.sessions = sessions
        self.mailbox = mailbox
        self.poll_s = poll_s
        self.owner = f"gw_{uuid.uuid4().hex[:16]}"
        self._seq = itertools.count()
        self._collector: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._claims = Claims()  # resume leases, where no mailbox holds them for every replica

    # -- the calls, wherever the session runs -----------------------------------------------------

    async def update_prompt(
        self, session_id: str, token: str | None, tenant: str, prompt: PromptUpdate | str
    ) -> tuple[int, int]:
        """Queue `prompt` (already checked) for the session; (its version, its first chunk)."""
        update = PromptUpdate(prompt) if isinstance(prompt, str) else prompt
        version, start = await self._call(
            "update_prompt", session_id, token, tenant, prompt=update.text,
            transition_chunks=update.transition_chunks, interpolation=update.interpolation,
            recache=update.recache,
        )  # fmt: skip
        return version, start

    async def close(self, session_id: str, token: str | None, tenant: str) -> None:
        await self._call("close", session_id, token, tenant)

    async def hand_over(self, session_id: str, token: str, tenant: str) -> None:
        """Stop the session's old connection (suspending it) so that a resume can take it up,
        and return once it let go. Nothing to do if no replica drives it, or if the one that
        did is gone (the resume then goes on from the snapshot, as after any lost replica)."""
        try:
            await self._call("hand_over", session_id, token, tenant)
        except NotFound:
            pass
        except Unavailable as err:  # its replica is gone (QueueTimeout: alive, did not let go)
            log.warning(
                "resume of %s goes on without a hand-over: %s", session_id, err.message,
                extra=ids(tenant, session_id),
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def resuming(self, session_id: str) -> AsyncIterator[None]:
        """Hold the lease on resuming `session_id` (on every replica, through the mailbox)
        while a resume takes the session up, waiting up to RESUME_WAIT_S for another resume of
        it to finish doing so. So resumes racing go one after another, the later one handing
        the session over from the earlier: one driver per session, whatever the client does."""
        claimant = uuid.uuid4().hex
        deadline = time.monotonic() + RESUME_WAIT_S
        while not await self._claim(session_id, claimant):
            if time.monotonic() >= deadline:
                raise QueueTimeout(
                    f"another resume of session {session_id!r} has been taking it up for "
                    f"{RESUME_WAIT_S:.0f} s; retry the resume"
                )
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self._unclaim(session_id, claimant)

    async def _claim(self, session_id: str, claimant: str) -> bool:
        if self.mailbox is not None:
            own_request_id()
            try:
                return await remote_result(
                    self.mailbox.claim.remote(session_id, claimant, RESUME_LEASE_S)
                )
            except Exception as err:  # a mailbox restarting: leases of this replica only
                log.warning("session mailbox unreachable for a resume lease (%r)", err)
        return self._claims.take(session_id, claimant, RESUME_LEASE_S)

    async def _unclaim(self, session_id: str, claimant: str) -> None:
        self._claims.give_back(session_id, claimant)
        if self.mailbox is not None:
            own_request_id()
            with contextlib.suppress(Exception):  # the lease then expires on its own
                await remote_result(self.mailbox.unclaim.remote(session_id, claimant))

    async def _call(self, op: str, session_id: str, token: str | None, tenant: str, **args):
        if not token:
            raise InvalidArgument(
                "session_token is required: quote the one session.started gave", "session_token"
            )
        if self.mailbox is None or self.sessions.holds(session_id):
            return await self._here(op, session_id, token, tenant, **args)
        self.start()
        own_request_id()
        send = self.mailbox.send.remote(session_id, tenant, op, {"token": token, **args})
        return await remote_result(send)

    async def _here(self, op: str, session_id: str, token: str | None, tenant: str, **args):
        live = self.sessions.get(session_id, token, tenant)
        if op == "update_prompt":
            chunks, interpolation = args.get("transition_chunks", 1), args.get("interpolation")
            recache = bool(args.get("recache", False))
            update = PromptUpdate(args["prompt"], chunks, interpolation or "linear", recache)
            return list(await live.driver.update_prompt(update))
        if op == "close":
            live.request_stop(EndReason.CLOSED)
            return True
        if op == "hand_over":
            live.request_stop(EndReason.DISCONNECTED)
            try:
                await asyncio.wait_for(self.sessions.released(session_id), HAND_OVER_S)
            except TimeoutError:
                raise QueueTimeout(
                    f"session {session_id!r} did not let go of its old connection within "
                    f"{HAND_OVER_S:.0f} s; retry the resume"
                ) from None
            return True
        raise ValueError(f"unknown control op {op!r}")

    # -- this replica's side of the mailbox -------------------------------------------------------

    def opened(self, session_id: str, tenant: str) -> None:
        """A session now driven here: tell the mailbox (at once; each poll tells it again)."""
        if self.mailbox is not None:
            self._spawn(self.registered(session_id, tenant))

    async def registered(self, session_id: str, tenant: str) -> None:
        """A session now driven here, returning once the mailbox knows it (a resume's lease
        ends only then, so the next resume's hand-over finds this replica)."""
        if self.mailbox is not None:
            self.start()
            own_request_id()
            await remote_result(
                self.mailbox.register.remote(self.owner, next(self._seq), session_id, tenant)
            )

    def ended(self, session_id: str) -> None:
        if self.mailbox is not None:
            own_request_id()
            self._spawn(remote_result(
                self.mailbox.release.remote(self.owner, next(self._seq), session_id)
            ))  # fmt: skip

    def start(self) -> None:
        """Poll the mailbox for letters to this replica's sessions (once; again if it died)."""
        if self.mailbox is not None and (self._collector is None or self._collector.done()):
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            sessions = {live.id: live.driver.plan.tenant for live in self.sessions.all()}
            seq = next(self._seq)
            own_request_id()
            try:
                letters = await remote_result(
                    self.mailbox.collect.remote(self.owner, seq, sessions, self.poll_s)
                )
            except Exception as err:  # the mailbox restarts: sessions register on the next poll
                log.warning("session mailbox unreachable (%s); retrying", type(err).__name__)
                await asyncio.sleep(1.0)
                continue
            for letter in letters:
                self._spawn(self._answer(letter))

    async def _answer(self, letter: dict) -> None:
        result, error = None, None
        args = dict(letter["args"])
        token = args.pop("token", None)
        try:
            if letter["op"] not in OPS:
                raise ValueError(f"unknown control op {letter['op']!r}")
            result = await self._here(
                letter["op"], letter["session_id"], token, letter["tenant"], **args
            )
        except ServiceError as err:
            error = err
        except Exception as err:
            error = Internal.logged(log, err, f"a session's {letter['op']} from another replica")
        own_request_id()
        await remote_result(self.mailbox.answer.remote(letter["id"], result, error))

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("session mailbox call failed: %r", task.exception())

    def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
