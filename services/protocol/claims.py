"""Leases on resuming a session: resumes of one session, however many and on whichever
gateway replicas, take it up one at a time, each handing it over from the one before.

Without them, two resumes racing (a client retrying while its first resume is still taking
the session up, on one replica or two) both read the snapshot and both drive the session: two
drivers under one id on the stages, and the registry or the mailbox naming only one of them.
A lease expires on its own (`ttl_s`), so a resume whose replica died mid-way holds nobody up
for longer than that.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Claims:
    """Who holds the lease on each key, and until when (pure, one event loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[str, tuple[str, float]] = {}  # key -> (claimant, held until)

    def take(self, key: str, claimant: str, ttl_s: float) -> bool:
        """Give `claimant` the lease on `key` for `ttl_s` unless another claimant holds an
        unexpired one (the same claimant renews its own)."""
        now = self.clock()
        for other, (_, until) in list(self._held.items()):
            if until <= now:
                del self._held[other]
        held = self._held.get(key)
        if held is not None and held[0] != claimant:
            return False
        self._held[key] = (claimant, now + ttl_s)
        return True

    def give_back(self, key: str, claimant: str) -> None:
        """End `claimant`'s lease on `key` (nothing if another holds it, or none does)."""
        held = self._held.get(key)
        if held is not None and held[0] == claimant:
            del self._held[key]

    def __len__(self) -> int:
        now = self.clock()
        return sum(1 for _, until in self._held.values() if until > now)
