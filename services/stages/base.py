"""What every stage replica shares: its session table, call counts and the idle-session reaper."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from protos.histream.v1 import stages_pb2
from services.link.replicas import LinkedStage
from services.logs import ids, through_serve
from services.protocol.identity import replica_name
from services.settings import ServeSettings
from services.stages.table import SessionTable

log = logging.getLogger("histream.stages")
T = TypeVar("T")


def rpc(method: Callable) -> Callable:
    """Count calls of a stage RPC per replica (`stats()`), e.g. to show bad input stops earlier."""

    @functools.wraps(method)
    async def counted(self, *args, **kwargs):
        self.calls[method.__name__] = self.calls.get(method.__name__, 0) + 1
        return await method(self, *args, **kwargs)

    return counted


class SessionStage(LinkedStage, Generic[T]):
    """What every stage shares: its session table, call counts and the idle-session reaper.

    A session whose client and gateway both vanished (a crashed gateway, a lost network) is
    freed after `session_idle_timeout_s` without requests, so its memory is never lost.
    """

    label = "stage"  # how messages and logs name this stage, e.g. "structure stage"

    def __init__(self, settings: ServeSettings) -> None:
        through_serve()
        settings.apply_threads()
        self.settings = settings
        self.sessions: SessionTable[T] = SessionTable(
            self.label, settings.max_sessions_per_replica, budget_bytes=settings.stage_budget_bytes
        )
        self.calls: dict[str, int] = {}
        self._reaper: asyncio.Task | None = None

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        timeout = self.settings.session_idle_timeout_s
        while True:
            await asyncio.sleep(max(0.5, timeout / 4))
            self.reap()

    def reap(self) -> list[str]:
        """Free every session idle for longer than the timeout, or kept (suspended) past its
        time; returns their ids. A session with a call in flight (its lock held: a phase or a
        decode longer than the timeout, or one waiting for it) is in use, not idle: it is
        marked used now and never freed under the call."""
        expired = []
        for session_id in self.sessions.idle(self.settings.session_idle_timeout_s):
            if self._busy(session_id):
                self.sessions.touch(session_id)
            else:
                expired.append(session_id)
        for session_id in expired:
            log.warning(
                "%s freed idle session %s", self.label, session_id,
                extra=ids(session_id=session_id),
            )  # fmt: skip
            self._free(session_id)
        return expired

    def _busy(self, session_id: str) -> bool:
        lock = getattr(self.sessions.peek(session_id), "lock", None)
        return lock is not None and lock.locked()

    def _free(self, session_id: str) -> None:
        """Free a session whose driver will not close it (idle, or kept past its time)."""
        self.sessions.pop(session_id)

    def _make_room(self, session_id: str, nbytes: int = 0) -> None:
        """Fail fast unless `session_id` (holding `nbytes`) can be added; kept (suspended)
        sessions are freed first when the replica is full: a resume rebuilds them from their
        snapshots."""
        for kept in self.sessions.evictable(nbytes):
            log.info(
                "%s freed suspended session %s for room", self.label, kept,
                extra=ids(session_id=kept),
            )  # fmt: skip
            self._free(kept)
        self.sessions.check_room(session_id, nbytes)

    def _kept(self, request: stages_pb2.ReleaseRequest) -> bool:
        """A suspend asking to keep the session's state for a resume (see ReleaseRequest)."""
        if not (request.suspend and request.keep_s > 0):
            return False
        return self.sessions.keep(request.session_id, request.keep_s)

    @rpc
    async def Touch(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        """The session's driver is alive (SessionNotHeld if this replica lost the session)."""
        self.sessions.get(request.session_id)
        return stages_pb2.StageAck(session_id=request.session_id)

    def stats(self) -> dict:
        """Sessions held and RPC calls served (this replica)."""
        return {
            "replica": replica_name(),
            "sessions": len(self.sessions),
            "calls": dict(self.calls),
            "bytes_held": self.sessions.held_bytes,
            "budget_bytes": self.sessions.budget_bytes,
        }
