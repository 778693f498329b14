"""Marks of unfinished work: one small object per queued or running video job, or unfinished
batch, under a prefix of its own (`Layout.unfinished_prefix`), so that the sweeps that look for
work whose replica is gone, every `job_lease_s / 3`, read only the records of unfinished work,
not every finished one a tenant ever kept.

A record is marked before its first write and unmarked after the write that finishes it. Marks
left behind (a replica stopped between those two writes; a mark whose record never came) are
removed when found. Records stored before marks were kept are marked by the first search of
each tenant in a process (`Marks.search`), which reads every record once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from services.errors import NotFound
from services.storage import ObjectNotFound, Storage, check_key

R = TypeVar("R")
# a mark with no record this old belongs to work that never stored one (or was deleted)
ORPHAN_MARK_S = 300.0


class Marks:
    """The marks under `prefix`; `call` runs a blocking storage call (as the record stores do:
    in a thread, storage failures answered as Unavailable)."""

    def __init__(self, storage: Storage, prefix: str, call: Callable[..., Awaitable[Any]]) -> None:
        self.storage, self.prefix, self.call = storage, prefix, call
        self.complete = False  # every unfinished record here has its mark (see search)

    def key(self, item_id: str) -> str:
        return check_key(self.prefix + item_id)

    async def mark(self, item_id: str) -> None:
        stamp = json.dumps({"marked_at": time.time()}).encode()
        await self.call(self.storage.put, self.key(item_id), stamp, "application/json")

    async def unmark(self, item_id: str) -> None:
        await self.call(self.storage.delete, self.key(item_id))

    async def ids(self) -> list[str]:
        keys = await self.call(self.storage.list, self.prefix)
        return [key.rsplit("/", 1)[1] for key in keys]

    async def orphaned(self, item_id: str) -> bool:
        """Whether a mark whose record is missing is old enough to be a leftover (a record
        may be on its way: the mark is written first)."""
        try:
            stamp = json.loads(await self.call(self.storage.get, self.key(item_id)))
            marked_at = float(stamp["marked_at"])
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            return True
        return time.time() - marked_at > ORPHAN_MARK_S

    async def search(
        self,
        get: Callable[[str], Awaitable[R]],
        unfinished: Callable[[R], bool],
        every: Callable[[], Awaitable[Iterable[R]]],
        id_of: Callable[[R], str],
    ) -> list[R]:
        """The unfinished records, by their marks (`get` raises NotFound for a missing one);
        leftover marks are removed. The first search also marks every unfinished record of
        `every()` that has none."""
        if not self.complete:
            marked = set(await self.ids())
            for record in await every():
                if unfinished(record) and id_of(record) not in marked:
                    await self.mark(id_of(record))
            self.complete = True
        found = []
        for item_id in await self.ids():
            try:
                record = await get(item_id)
            except NotFound:
                if await self.orphaned(item_id):
                    await self.unmark(item_id)
                continue
            if unfinished(record):
                found.append(record)
            else:
                await self.unmark(item_id)
        return found
