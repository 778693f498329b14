"""The sessions one stage replica holds: bounded by its admission limit, with last-use times."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from services.errors import AtCapacity, InvalidArgument, SessionNotHeld
from services.protocol.identity import replica_name

T = TypeVar("T")
# Session ids closed before they were opened here, remembered so that an open still in flight
# (its caller cancelled it, then closed) cannot add the session afterwards. Ids are never
# reused: a few thousand cover any such race.
FORGOTTEN = 4096


class SessionTable(Generic[T]):
    """The sessions one replica holds, bounded by its admission limits (a count, and a byte
    budget when set: each session's exact bytes are known before it is allocated), with
    last-use times."""

    def __init__(
        self,
        stage: str,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
        budget_bytes: int | None = None,
    ) -> None:
        self.stage = stage
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.clock = clock
        self._items: dict[str, T] = {}
        self._bytes: dict[str, int] = {}
        self._used: dict[str, float] = {}
        self._kept: dict[str, float] = {}  # suspended sessions kept for a resume, until when
        self._closed: OrderedDict[str, None] = OrderedDict()  # see FORGOTTEN

    def keep(self, session_id: str, seconds: float) -> bool:
        """Keep a suspended session for `seconds` (a resume takes it up); False if not held."""
        if session_id not in self._items:
            return False
        self._kept[session_id] = self.clock() + seconds
        return True

    def take_up(self, session_id: str) -> T | None:
        """A kept session, claimed by a resume (no longer kept); None if none is kept here."""
        if self._kept.pop(session_id, None) is None:
            return None
        self._used[session_id] = self.clock()
        return self._items[session_id]

    @property
    def held_bytes(self) -> int:
        return sum(self._bytes.values())

    def _fits(self, count: int, held: int, nbytes: int) -> bool:
        over_budget = self.budget_bytes is not None and held + nbytes > self.budget_bytes
        return count < self.capacity and not over_budget

    def evictable(self, nbytes: int = 0) -> list[str]:
        """The kept sessions to free, soonest-expiring first, for the room a new session of
        `nbytes` needs here."""
        count, held, out = len(self._items), self.held_bytes, []
        for session_id in sorted(self._kept, key=self._kept.__getitem__):
            if self._fits(count, held, nbytes):
                break
            out.append(session_id)
            count, held = count - 1, held - self._bytes.get(session_id, 0)
        return out

    def check_room(self, session_id: str, nbytes: int = 0) -> None:
        """Fail fast, before any work, when `session_id` (holding `nbytes`) could not be
        added."""
        if session_id in self._closed:
            raise SessionNotHeld(
                f"session {session_id!r} was closed on this {self.stage} before it opened"
            )
        if session_id in self._items:
            raise InvalidArgument(f"session {session_id!r} is already open on this {self.stage}")
        if len(self._items) >= self.capacity:
            raise AtCapacity(
                f"{self.stage} replica {replica_name()} holds {len(self._items)} sessions, "
                f"its limit (max_sessions_per_replica={self.capacity}); retry later"
            )
        held = self.held_bytes
        if not self._fits(len(self._items), held, nbytes):
            raise AtCapacity(
                f"{self.stage} replica {replica_name()} holds {held} bytes of sessions and this "
                f"one needs {nbytes}: over its budget (stage_budget_bytes={self.budget_bytes}); "
                "retry later"
            )

    def add(self, session_id: str, item: T, nbytes: int = 0) -> None:
        self.check_room(session_id, nbytes)
        self._items[session_id] = item
        self._bytes[session_id] = nbytes
        self._used[session_id] = self.clock()

    def get(self, session_id: str) -> T:
        item = self._items.get(session_id)
        if item is None:
            raise SessionNotHeld(
                f"{self.stage} replica {replica_name()} does not hold session {session_id!r} "
                "(never opened here, closed, idle too long, or moved by a replica change)"
            )
        self._used[session_id] = self.clock()
        return item

    def peek(self, session_id: str) -> T | None:
        """The session if held, without marking it used."""
        return self._items.get(session_id)

    def touch(self, session_id: str) -> None:
        """Mark a held session used now (a call on it is still in flight)."""
        if session_id in self._items:
            self._used[session_id] = self.clock()

    def pop(self, session_id: str) -> T | None:
        """Remove and return the session; closing one not held here keeps it from opening."""
        self._used.pop(session_id, None)
        self._kept.pop(session_id, None)
        self._bytes.pop(session_id, None)
        item = self._items.pop(session_id, None)
        if item is None:
            self._closed[session_id] = None
            while len(self._closed) > FORGOTTEN:
                self._closed.popitem(last=False)
        return item

    def discard(self, session_id: str) -> T | None:
        """Remove the session if held, as a restore that replaces it does (no tombstone)."""
        self._used.pop(session_id, None)
        self._kept.pop(session_id, None)
        self._bytes.pop(session_id, None)
        return self._items.pop(session_id, None)

    def idle(self, timeout_s: float) -> list[str]:
        """Sessions not used for longer than `timeout_s`, or kept past their time."""
        now = self.clock()
        return [
            sid
            for sid, used in self._used.items()
            if (now > self._kept[sid] if sid in self._kept else now - used > timeout_s)
        ]

    def values(self) -> list[T]:
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
