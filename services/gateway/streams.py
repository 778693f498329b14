"""Streaming sessions as the API sees them: opened, resumed by id, their events, prompt
updates, and the sweep that ends the ones nobody resumed in time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from histream_model.config import Preset
from services.errors import QueueFull, Unavailable
from services.gateway.control import SessionControl
from services.gateway.metrics import Metrics
from services.gateway.quotas import QuotaKeeper
from services.gateway.requests import (
    SessionStart,
    check_prompt_update,
    endless_frames,
    resolve_session,
)
from services.protocol import ChunkReady, EndReason, SessionEvent, StreamKind
from services.sessions import (
    Durability,
    LiveSession,
    SessionDriver,
    SessionPlan,
    SessionRegistry,
    StageHandles,
)
from services.sessions.resume import Sweeper, plan_of, resumable
from services.settings import ServeSettings
from services.storage import Layout, Storage

log = logging.getLogger("histream.gateway")


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


class Streams:
    def __init__(
        self,
        settings: ServeSettings,
        preset: Preset,
        handles: StageHandles,
        durability: Durability,
        storage: Storage,
        metrics: Metrics,
        tenants: Callable[[], Iterable[str]] | None = None,
        quotas: QuotaKeeper | None = None,
        mailbox=None,
    ) -> None:
        self.quotas = quotas
        self.settings = settings
        self.preset = preset
        self.handles = handles
        self.durability = durability
        self.storage = storage
        self.layout = Layout(settings.tenant)
        self.metrics = metrics
        self.sessions = SessionRegistry()
        # prompt updates, closes and resumes by id, wherever the session runs
        self.control = SessionControl(self.sessions, mailbox)
        self.draining = False
        assert durability.store is not None
        self.sweeper = Sweeper(
            durability.store,
            live=self.sessions.holds,
            period_s=max(0.5, settings.session_resume_grace_s / 3),
            tenants=tenants,
        )

    def _admit_session(self) -> None:
        s = self.settings
        self.sweeper.start()
        if self.draining:
            raise Unavailable("this gateway replica is shutting down; start the session again")
        if len(self.sessions) >= s.max_live_sessions:
            raise QueueFull(
                f"this gateway replica has {len(self.sessions)} open sessions, its limit "
                f"(max_live_sessions={s.max_live_sessions}); retry after {s.retry_after_s} s",
                retry_after_s=s.retry_after_s,
            )

    def open(self, body: SessionStart, tenant: str | None = None) -> LiveSession:
        """Validate a session request of `tenant` (by default the service's own; nothing
        reaches a stage on bad input) and register it."""
        s = self.settings
        layout = Layout(tenant) if tenant else self.layout
        self._admit_session()
        seconds, max_frames = s.max_session_seconds, None
        if self.quotas is not None:  # a tenant's quotas may cut an endless session shorter
            quota_seconds, max_frames = self.quotas.endless_limits(layout.tenant)
            seconds = min(seconds, quota_seconds or seconds)
        cap = endless_frames(self.preset, s.frame_rate, seconds, max_frames)
        generation = resolve_session(
            body, self.preset, s.served_model, s.frame_rate, s.max_prompt_chars, cap
        )
        if self.quotas is not None:
            self.quotas.admit_session(layout.tenant, generation)
        session_id = new_session_id()
        plan = SessionPlan.of(
            generation, session_id, StreamKind.SESSION, layout.tenant, s.frame_rate
        )
        live = LiveSession(
            session_id,
            SessionDriver(self.handles, plan, self.durability, self.metrics.restored),
            playlist_key=layout.session_playlist_key(session_id),
        )
        self.sessions.add(live)
        self.control.opened(session_id, layout.tenant)
        return live

    async def resume(
        self, session_id: str, token: str, last_chunk: int, tenant: str | None = None
    ) -> LiveSession:
        """A session of `tenant`'s taken up from its snapshot by a client quoting its token;
        its events re-send the chunks after `last_chunk`, then go on."""
        self._admit_session()
        tenant = tenant or self.layout.tenant
        if not token:
            await resumable(self.durability.store, session_id, token, last_chunk, tenant)
        async with self.control.resuming(session_id):  # one resume of a session at a time
            # the old connection (on any replica) may not be gone yet
            await self.control.hand_over(session_id, token, tenant)
            live = await self._take_up(session_id, token, last_chunk, tenant)
            try:
                await self.control.registered(session_id, tenant)
            except Exception as err:  # the mailbox restarting: the next poll registers it
                log.warning("resumed session %s not yet registered (%r)", session_id, err)
            return live

    async def _take_up(
        self, session_id: str, token: str, last_chunk: int, tenant: str
    ) -> LiveSession:
        store = self.durability.store
        snapshot = await resumable(store, session_id, token, last_chunk, tenant)
        plan = plan_of(snapshot, self.preset)
        driver = SessionDriver(
            self.handles, plan, self.durability, self.metrics.restored, snapshot=snapshot
        )
        storage, layout = self.storage, Layout(tenant)

        async def replay(index: int) -> bytes:
            key = layout.session_segment_key(session_id, index + 1)
            return await asyncio.to_thread(storage.get, key)

        live = LiveSession(
            session_id, driver, layout.session_playlist_key(session_id), token=token,
            resume_after=last_chunk, replay=replay,
        )  # fmt: skip
        self.sessions.add(live)
        return live

    def open_count(self, tenant: str) -> int:
        """The tenant's sessions open on this replica."""
        return sum(1 for live in self.sessions.all() if live.driver.plan.tenant == tenant)

    async def events(self, live: LiveSession) -> AsyncIterator[SessionEvent]:
        """The session's events until it ends; it is counted as active meanwhile."""
        s = self.settings
        try:
            with self.metrics.track(StreamKind.SESSION, live.driver):
                events = live.events(
                    s.queue_timeout_s, s.session_resume_grace_s, s.session_snapshot_ttl_s
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, ChunkReady):
                            self.metrics.chunk(event)
                        yield event
        finally:
            self.sessions.remove(live.id)
            self.control.ended(live.id)

    async def update_prompt(
        self, live: LiveSession, message: Mapping[str, object]
    ) -> tuple[int, int]:
        """A prompt update from the session's own connection (WebSocket): `message`'s
        `prompt`, `transition_chunks` and `interpolation`."""
        update = check_prompt_update(message, self.settings.max_prompt_chars)
        return await live.driver.update_prompt(update)

    async def update_prompt_by_id(
        self,
        session_id: str,
        token: str | None,
        message: Mapping[str, object],
        tenant: str | None = None,
    ) -> tuple[int, int]:
        """A prompt update for `tenant`'s session quoting its token, wherever it runs:
        (the prompt's version, the chunk it applies from)."""
        update = check_prompt_update(message, self.settings.max_prompt_chars)
        tenant = tenant or self.layout.tenant
        return await self.control.update_prompt(session_id, token, tenant, update)

    async def close_by_id(
        self, session_id: str, token: str | None, tenant: str | None = None
    ) -> None:
        """Close `tenant`'s session quoting its token, wherever it runs."""
        await self.control.close(session_id, token, tenant or self.layout.tenant)

    async def drain(self, timeout_s: float) -> int:
        """Suspend every session here (resumable by id for session_snapshot_ttl_s)."""
        self.draining = True
        live = self.sessions.all()
        for session in live:
            session.request_stop(EndReason.DRAINING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sessions.emptied(), timeout_s)
        return len(live)
