"""Lifecycles as enum state machines: the statuses a session or a video job moves through and
the moves allowed between them, checked on every transition."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)


class SessionStatus(enum.StrEnum):
    """Where one session (a streaming session, or a video job's generation) stands."""

    OPENING = "opening"  # prompt encoded; stages admitting it (waits here for capacity)
    RUNNING = "running"  # chunks being generated
    FINISHING = "finishing"  # media being sealed: MP4 + manifest, or the playlist's ENDLIST
    ENDED = "ended"  # sealed: every chunk, or those before a requested close
    CLOSED = "closed"  # stopped unsealed: the client went away or the job was cancelled
    SUSPENDED = "suspended"  # stopped to go on later from its snapshot (a drain)
    FAILED = "failed"  # an error stopped it


SESSION_TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.OPENING: frozenset(  # suspended: a resume stopped before it took up
        {SessionStatus.RUNNING, SessionStatus.CLOSED, SessionStatus.SUSPENDED, SessionStatus.FAILED}
    ),
    SessionStatus.RUNNING: frozenset(
        {
            SessionStatus.FINISHING,
            SessionStatus.CLOSED,
            SessionStatus.SUSPENDED,
            SessionStatus.FAILED,
        }
    ),
    SessionStatus.FINISHING: frozenset(
        {SessionStatus.ENDED, SessionStatus.CLOSED, SessionStatus.FAILED}
    ),
    SessionStatus.ENDED: frozenset(),
    SessionStatus.CLOSED: frozenset(),
    SessionStatus.SUSPENDED: frozenset(),
    SessionStatus.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the lifecycle does not allow: a bug in the caller, never a client's error."""


class Lifecycle(Generic[S]):
    """The current status of one thing and the transitions it may take from there."""

    def __init__(self, initial: S, transitions: Mapping[S, frozenset[S]], name: str) -> None:
        missing = set(type(initial)) - set(transitions)
        if missing:
            raise ValueError(f"transitions of {name} lack statuses {sorted(map(str, missing))}")
        self.status = initial
        self.transitions = transitions
        self.name = name  # for messages, e.g. "session sess_..."

    @property
    def terminal(self) -> bool:
        return not self.transitions[self.status]

    def allows(self, status: S) -> bool:
        return status in self.transitions[self.status]

    def to(self, status: S) -> None:
        if not self.allows(status):
            allowed = sorted(str(s) for s in self.transitions[self.status]) or "nothing (final)"
            raise IllegalTransition(
                f"{self.name}: {self.status} -> {status} is not allowed; from {self.status}: "
                f"{allowed}"
            )
        self.status = status

    def __repr__(self) -> str:
        return f"Lifecycle({self.name}: {self.status})"
