"""Resuming a streaming session by id from its snapshot (its client went away, its gateway died,
the service was drained), and ending for good the ones nobody resumed in time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable

from histream_model.config import Preset
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument, NotFound
from services.logs import ids
from services.protocol import StreamKind, shape_of
from services.protocol.snapshot import stored_frames
from services.sessions.periodic import Periodic
from services.sessions.remote import SessionPlan
from services.sessions.restore import SnapshotStore
from services.storage import Layout, SessionWriter

log = logging.getLogger("histream.sessions")


async def resumable(
    store: SnapshotStore, session_id: str, token: str, last_chunk: int, tenant: str | None = None
) -> stages_pb2.SessionSnapshot:
    """The session's snapshot, for a client of `tenant` quoting its token. An unknown id, one
    of another tenant, a wrong token and a session past its resume window all answer the same
    NotFound."""
    if not token:
        raise InvalidArgument(
            "session_token is required: quote the one session.started gave", "session_token"
        )
    gone = NotFound(
        f"no session {session_id!r} to resume (unknown, ended, or past its resume window)",
        param="session_id",
    )
    try:
        snapshot = await store.load(str(StreamKind.SESSION), session_id, tenant)
    except ValueError:  # not a valid session id
        raise gone from None
    sha = hashlib.sha256(token.encode()).hexdigest()
    if snapshot is None or not hmac.compare_digest(snapshot.token_sha256, sha):
        raise gone
    if time.time() > snapshot.resumable_until:
        raise gone
    oldest = snapshot.first_chunk - 1  # endless sessions re-send their latest chunks only
    if not oldest <= last_chunk < snapshot.next_chunk:
        kept = "" if oldest < 0 else f"; chunks before {snapshot.first_chunk} are no longer kept"
        raise InvalidArgument(
            f"last_chunk={last_chunk} must be in [{oldest}, {snapshot.next_chunk - 1}]: the "
            f"session has delivered chunks 0..{snapshot.next_chunk - 1}{kept}",
            param="last_chunk",
        )
    return snapshot


def plan_of(snapshot: stages_pb2.SessionSnapshot, preset: Preset) -> SessionPlan:
    """The session a snapshot describes, as a driver takes it up."""
    return SessionPlan(
        object_id=snapshot.object_id,
        kind=StreamKind.from_proto(snapshot.kind),
        tenant=snapshot.spec.tenant,
        shape=shape_of(snapshot.spec, preset),
        seed=snapshot.spec.seed,
        prompt=snapshot.prompts[0].prompt,
        fps=snapshot.fps,
        endless=snapshot.spec.endless,
    )


class Sweeper(Periodic):
    """Ends for good the sessions nobody resumed in time: seals their playlists (ENDLIST) and
    removes their snapshots. Any gateway replica may sweep; sealing twice is harmless."""

    def __init__(
        self,
        store: SnapshotStore,
        live: Callable[[str], bool],
        period_s: float,
        tenants: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.store = store
        self.live = live  # whether this replica drives the session now
        self.period_s = period_s
        # whose sessions to look through: every tenant that can call
        self.tenants = tenants or (lambda: [store.layout.tenant])

    async def tick(self) -> None:
        await self.sweep()

    async def sweep(self) -> list[str]:
        """End every expired session; returns their ids."""
        ended = []
        for tenant in self.tenants():
            ended += await self._sweep(tenant)
        return ended

    async def _sweep(self, tenant: str) -> list[str]:
        storage, layout = self.store.storage, self.store.layout_of(tenant)
        keys = await asyncio.to_thread(storage.list, layout.sessions_prefix())
        ended, kind = [], str(StreamKind.SESSION)
        for key in keys:
            if not key.endswith("/snapshot.pb"):
                continue
            session_id = key.rsplit("/", 2)[-2]
            if self.live(session_id):
                continue
            snapshot = await self.store.load(kind, session_id, tenant)
            if snapshot is None or time.time() <= snapshot.resumable_until:
                continue
            await asyncio.to_thread(self._seal, snapshot, layout)
            await self.store.delete(kind, session_id, tenant)
            log.info(
                "session %s was not resumed in time; ended", session_id,
                extra=ids(layout.tenant, session_id),
            )  # fmt: skip
            ended.append(session_id)
        return ended

    def _seal(self, snapshot: stages_pb2.SessionSnapshot, layout: Layout) -> None:
        first, frames = stored_frames(snapshot)
        window = max(1, len(frames)) if snapshot.spec.endless else None
        writer = SessionWriter(
            self.store.storage, layout, snapshot.object_id, snapshot.fps, window=window
        )
        writer.resume(frames, first + 1)
        writer.end()
