"""Streaming sessions a gateway replica drives: their events from open to end, how a client
asks one to stop, and the registry prompt updates and closes find them in."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument, NotFound
from services.protocol import (
    ChunkReady,
    EndReason,
    InitSegment,
    PromptApplied,
    SessionEnded,
    SessionQueued,
    SessionStarted,
    SessionStatus,
)
from services.protocol.events import SessionEvent
from services.sessions.driver import SessionDriver


async def until_set(
    chunks: AsyncIterator[ChunkReady], stop: asyncio.Event
) -> AsyncIterator[ChunkReady]:
    """Iterate `chunks` until they end or `stop` is set, whichever comes first; always closes
    `chunks` (which frees the session's stages) on the way out."""
    stopper = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield event
    finally:
        for task in (step, stopper):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await chunks.aclose()  # type: ignore[attr-defined]


class LiveSession:
    """One streaming session: its driver, its public id, and whether it was asked to stop.

    A client that goes away (or is cut off), or a drain, leaves the session suspended: the
    chunks already started are finished, the stages keep its state for `grace_s` (a resume
    within it goes on at once), and it is resumable from its snapshot for `ttl_s`. A resume
    is a `LiveSession` over a
    driver made from the session's snapshot, with `resume_after` the client's last chunk: its
    events re-send the chunks the client missed (`replay`) before the live ones.
    """

    def __init__(
        self,
        session_id: str,
        driver: SessionDriver,
        playlist_key: str,
        token: str | None = None,
        resume_after: int | None = None,
        replay: Callable[[int], Awaitable[bytes]] | None = None,
    ) -> None:
        self.id = session_id
        self.driver = driver
        self.playlist_key = playlist_key
        # CLOSED (asked), PROTOCOL_ERROR (misbehaved), DRAINING (shutdown) or DISCONNECTED
        self.stop_reason: EndReason | None = None
        self._stop = asyncio.Event()
        self.queue_position: Callable[[], int] = lambda: 1  # set by the registry
        # what a client must quote to change, close or resume the session by id
        self.token = token or secrets.token_urlsafe(24)
        driver.record.token_sha256 = hashlib.sha256(self.token.encode()).hexdigest()
        self.resume_after = resume_after  # None: a new session
        self.replay = replay  # a stored segment's bytes by chunk index (resumes)

    def request_stop(self, reason: EndReason = EndReason.CLOSED) -> None:
        """Stop generating: DISCONNECTED and DRAINING suspend the session (resumable by id),
        any other reason seals what was generated and ends with that reason. A disconnect
        overrides an earlier reason."""
        if self.stop_reason is None or reason == EndReason.DISCONNECTED:
            self.stop_reason = reason
        if self.stop_reason in (EndReason.DISCONNECTED, EndReason.DRAINING):
            self.driver.settle()
        self._stop.set()

    async def events(
        self, deadline_s: float, grace_s: float = 30.0, ttl_s: float = 3600.0
    ) -> AsyncIterator[SessionEvent]:
        """Open (or resume; waiting up to `deadline_s` for capacity), then every event until
        the session completes or is stopped. Leaving early suspends it (see the class)."""
        driver, shape = self.driver, self.driver.plan.shape
        try:
            async for position in self._open(deadline_s):
                yield SessionQueued(position)
            if self._stop.is_set():  # stopped while it waited: nothing was generated
                if self.stop_reason == EndReason.DRAINING:  # a resume's snapshot stays
                    await driver.suspend(EndReason.DRAINING, ttl_s, grace_s)
                elif self.stop_reason != EndReason.DISCONNECTED:
                    yield SessionEnded(self.stop_reason or EndReason.CLOSED)
                return
            yield SessionStarted.of(
                self.id, shape, driver.plan.fps, self.playlist_key, self.token,
                resumed=self.resume_after is not None, endless=driver.plan.endless,
            )  # fmt: skip
            yield InitSegment(driver.init_segment)
            async for missed in self._missed():
                yield missed
            version = driver.record.prompt_version(driver.next_chunk - 1)
            async with contextlib.aclosing(until_set(driver.chunks(), self._stop)) as chunks:
                try:
                    async for chunk in chunks:
                        if chunk.prompt_version != version:
                            version = chunk.prompt_version
                            yield PromptApplied(prompt_version=version, from_chunk=chunk.index)
                        yield chunk
                except (GeneratorExit, asyncio.CancelledError):  # the consumer is gone
                    self.request_stop(EndReason.DISCONNECTED)
                    raise
            if self.stop_reason == EndReason.DRAINING:  # resumed by id later, unsealed
                await driver.suspend(EndReason.DRAINING, ttl_s, grace_s)
                yield SessionEnded(EndReason.DRAINING)
                return
            if self.stop_reason == EndReason.DISCONNECTED:
                return
            reason = self.stop_reason or EndReason.COMPLETED
            await driver.finish(reason)
            yield SessionEnded(reason)
        except Exception:
            if driver.taking_up:  # a resume that failed to take the session up: try again
                await driver.suspend(EndReason.FAILED, ttl_s, grace_s)
            else:
                await driver.close(EndReason.FAILED)
            raise
        finally:
            if self.stop_reason in (None, EndReason.DISCONNECTED):  # the client is gone
                await driver.suspend(EndReason.DISCONNECTED, ttl_s, grace_s)
            await driver.close(self.stop_reason or EndReason.DISCONNECTED)

    async def _missed(self) -> AsyncIterator[ChunkReady]:
        """A resume: the chunks decoded after the client's last one, from storage."""
        if self.resume_after is None or self.replay is None:
            return
        record = self.driver.record
        first_frame = record.first_frame(self.resume_after + 1)
        for index in range(self.resume_after + 1, record.decoded):
            frames = record.frames[index]
            yield ChunkReady(
                index=index, first_frame=first_frame, num_frames=frames,
                media=await self.replay(index), object_key="",
                prompt_version=record.prompt_version(index), latents=stages_pb2.Tensor(),
                latents_sha256=record.digests.get(index, ""), denoise_seconds=0.0,
                decode_seconds=0.0, kv_bytes=self.driver.kv_bytes,
            )  # fmt: skip
            first_frame += frames

    async def _open(self, deadline_s: float) -> AsyncIterator[int]:
        """Open (or resume) the session; while it waits for capacity, its place in line when
        it changes. A stop request (a close, a lost client) ends the wait."""
        waits: asyncio.Queue[None] = asyncio.Queue()
        begin = self.driver.open if self.resume_after is None else self.driver.resume
        opening = asyncio.ensure_future(begin(deadline_s, lambda: waits.put_nowait(None)))
        stopped = asyncio.ensure_future(self._stop.wait())
        told = 0
        try:
            while not opening.done() and not stopped.done():
                waited = asyncio.ensure_future(waits.get())
                await asyncio.wait({opening, waited, stopped}, return_when=asyncio.FIRST_COMPLETED)
                waited.cancel()
                position = self.queue_position()
                if waited.done() and not waited.cancelled() and position != told:
                    told = position
                    yield position
            if opening.done():
                await opening
        finally:
            stopped.cancel()
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(BaseException):
                    await opening


class SessionRegistry:
    """The live sessions of this replica, by public id."""

    def __init__(self) -> None:
        self._live: dict[str, LiveSession] = {}
        self._changed = asyncio.Event()

    def add(self, live: LiveSession) -> None:
        self._live[live.id] = live
        live.queue_position = lambda: self.position(live.id)

    def position(self, session_id: str) -> int:
        """1 + the sessions registered before this one that still wait for capacity."""
        ahead = 0
        for other in self._live.values():
            if other.id == session_id:
                break
            ahead += other.driver.status == SessionStatus.OPENING
        return ahead + 1

    def remove(self, session_id: str) -> None:
        self._live.pop(session_id, None)
        self._changed.set()

    def holds(self, session_id: str) -> bool:
        return session_id in self._live

    async def released(self, session_id: str) -> None:
        """Returns once the session is no longer live here."""
        while session_id in self._live:
            self._changed.clear()
            await self._changed.wait()

    def all(self) -> list[LiveSession]:
        return list(self._live.values())

    async def emptied(self) -> None:
        """Returns once no session is left."""
        while self._live:
            self._changed.clear()
            await self._changed.wait()

    def get(self, session_id: str, token: str | None, tenant: str | None = None) -> LiveSession:
        """The session, for a caller (of `tenant`, when given) quoting its token. A wrong
        token or another tenant's session answers exactly as an unknown id does, so ids reveal
        nothing."""
        if not token:
            raise InvalidArgument(
                "session_token is required: quote the one session.started gave", "session_token"
            )
        live = self._live.get(session_id)
        foreign = live is not None and tenant is not None and live.driver.plan.tenant != tenant
        if live is None or foreign or not hmac.compare_digest(live.token, token):
            raise NotFound(f"no running session with id {session_id!r}", param="session_id")
        return live

    def __len__(self) -> int:
        return len(self._live)
