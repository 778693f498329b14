"""Sessions that survive their replicas: the snapshot a driver keeps in storage after every
decoded chunk, and restores on any replica when a stage answers that it does not hold the
session (a replica was lost, or the replica set changed and the session's id now routes
elsewhere). Each stage call is retried once, after its stages are rebuilt from the record."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, ReplicaLost, SessionNotHeld
from services.protocol import StageName
from services.sessions.record import SessionRecord
from services.sessions.remote import SessionStages
from services.storage import Layout, ObjectNotFound, Storage

log = logging.getLogger("histream.sessions")
T = TypeVar("T")


@dataclass(frozen=True)
class SnapshotStore:
    """Where session snapshots live: each under its tenant's prefix (`layout`'s tenant unless
    another is named; a snapshot is saved under the tenant of its spec); each put is atomic
    for readers."""

    storage: Storage
    layout: Layout

    def layout_of(self, tenant: str | None) -> Layout:
        return self.layout if tenant in (None, "", self.layout.tenant) else Layout(tenant)

    def key(self, kind: str, object_id: str, tenant: str | None = None) -> str:
        return self.layout_of(tenant).snapshot_key(kind, object_id)

    async def save(self, snapshot: stages_pb2.SessionSnapshot, kind: str) -> None:
        data = snapshot.SerializeToString()
        key = self.key(kind, snapshot.object_id, snapshot.spec.tenant)
        await asyncio.to_thread(self.storage.put, key, data, "application/x-protobuf")

    async def load(
        self, kind: str, object_id: str, tenant: str | None = None
    ) -> stages_pb2.SessionSnapshot | None:
        try:
            data = await asyncio.to_thread(self.storage.get, self.key(kind, object_id, tenant))
        except ObjectNotFound:
            return None
        return stages_pb2.SessionSnapshot.FromString(data)

    async def delete(self, kind: str, object_id: str, tenant: str | None = None) -> None:
        await asyncio.to_thread(self.storage.delete, self.key(kind, object_id, tenant))


@dataclass(frozen=True)
class Durability:
    """How a driver keeps its session restorable (ServeSettings' snapshot_* fields)."""

    window_chunks: int = 2  # chunks a denoiser replays besides the anchor
    decode_frames: int = 24  # latent frames a decoder re-decodes
    store: SnapshotStore | None = None  # None: restores from the driver's memory only
    # a suspended session's stages keep its state this long, for a resume to take up as is
    resume_grace_s: float = 30.0
    snapshot_ttl_s: float = 3600.0  # a session whose client or driver is gone stays resumable
    heartbeat_s: float = 5.0  # how often the driver touches its stages (a third of their idle)
    settle_s: float = 30.0  # a suspend first finishes the chunks already started, this long
    # an endless session's record keeps its latest this-many chunks (a resume re-sends at most
    # those; hls_window_segments: their segments are still stored)
    replay_chunks: int = 60


class Restorer:
    """Rebuilds stages from the session's record and retries the call that found them empty.

    While the replica set changes (a replica died and its successor starts), a call may reach
    the dead one again: restore and retry go on, with backoff, until `deadline_s` has passed.
    So do they while the replica the session now routes to is full (a stage scaled up or down
    under load: its sessions were rebalanced onto a replica at `max_sessions_per_replica`), as
    its other sessions end or move.
    """

    deadline_s = 60.0

    def __init__(
        self,
        stages: SessionStages,
        record: SessionRecord,
        on_restore: Callable[[StageName, float], None] | None = None,
    ) -> None:
        self.stages = stages
        self.record = record
        self.on_restore = on_restore or (lambda stage, seconds: None)
        self.count = 0  # restores so far

    async def retried(self, call: Callable[[], Awaitable[T]], restore: Callable[[], Awaitable]):
        """`call()`; if a stage does not hold the session (or its replica died), `restore()`
        and `call()` again."""
        started = None  # the deadline runs from the first failure: a call may
        while True:  # take long (or hang until stage_call_timeout_s) before it fails
            try:
                return await call()
            except SessionNotHeld as err:
                started = started if started is not None else time.monotonic()
                if time.monotonic() - started > self.deadline_s:
                    raise
                log.warning(
                    "session %s: %s; restoring", self.stages.session_id, err.message,
                    extra=self.stages.plan.log_ids(),
                )  # fmt: skip
            await self.rebuild(restore, started)

    async def rebuild(self, restore: Callable[[], Awaitable], started: float) -> None:
        """`restore()`, again with backoff while it reaches a replica that is going away or
        is full, until `deadline_s` after `started` (the first failure)."""
        delay = 0.1
        while True:
            try:
                await restore()
                return
            except (ReplicaLost, AtCapacity) as err:
                if time.monotonic() - started > self.deadline_s:
                    raise
                if isinstance(err, AtCapacity):
                    log.warning(
                        "session %s: %s; waiting to restore", self.stages.session_id,
                        err.message, extra=self.stages.plan.log_ids(),
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def denoisers(self, next_chunk: int) -> None:
        """Both denoisers rebuilt for chunk `next_chunk` from the same record, so their caches
        agree (one that still held the session is replaced too)."""
        request = self.record.restore(next_chunk, self.stages.session_id)
        await asyncio.gather(
            *(self._restore(name, "RestoreSession", request) for name in self.stages.plan.denoisers)
        )

    async def decoder(self) -> None:
        request = self.record.restore(self.record.decoded, self.stages.session_id)
        await self._restore(StageName.DECODE, "RestoreStream", request)

    async def _restore(self, name: StageName, method: str, request) -> None:
        started = time.perf_counter()
        await self.stages.call(name, method, request)
        self.count += 1
        self.on_restore(name, time.perf_counter() - started)
