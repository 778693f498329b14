"""Driving one session through the stages: the distributed form of Algorithm 1's outer loop.

For each chunk the driver walks the chunk's plan (`histream_model.schedules`) up to its output
phase, sending each phase to the stage that holds its resolution with the previous phase's
result; the stage that runs the output phase hands the follow-up cache writes on itself. The
chunk's latents then go to the decode pool. Decoding chunk i overlaps denoising chunk i + 1 (the
denoisers never wait for the VAE); decode calls of one session stay in order. Every stage call
carries the session's routing id, so it reaches the replica holding that session.

Video jobs and streaming sessions use the same driver; only what they do with the chunks
differs. Its status moves through `SessionStatus` (services.protocol.lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, InvalidArgument, ReplicaLost, SessionNotHeld
from services.protocol import (
    SESSION_TRANSITIONS,
    ChunkReady,
    EndReason,
    Lifecycle,
    SessionStatus,
    StageName,
)
from services.sessions.chunks import ChunkWork
from services.sessions.prompts import PromptUpdate, PromptVersions
from services.sessions.record import SessionRecord
from services.sessions.remote import Opened, SessionPlan, SessionStages, StageHandles
from services.sessions.restore import Durability, Restorer

log = logging.getLogger("histream.sessions")

OPEN_ATTEMPTS_LOST = 3  # an open lost with its replica (or silent) is tried again this often
STALL_LOG_S = 60.0  # a chunk awaited this long is logged with what the session's tasks wait on


def stacks(tasks: list[asyncio.Task]) -> str:
    """Where each unfinished task of `tasks` waits (innermost frame last)."""
    out = io.StringIO()
    for task in tasks:
        if not task.done():
            task.print_stack(file=out)
    return out.getvalue()


async def awaited(
    item: asyncio.Future, what: str, tasks: Callable[[], list[asyncio.Task]], extra: dict
):
    """`item`'s result; each STALL_LOG_S it takes, a warning with where `tasks` wait (a
    stuck session shows where it is stuck, in the gateway log)."""
    waited = 0.0
    while True:
        done, _ = await asyncio.wait({item}, timeout=STALL_LOG_S)
        if done:
            return item.result()
        waited += STALL_LOG_S
        log.warning("%s: no progress for %.0f s; its tasks wait at:\n%s", what, waited,
                    stacks(tasks()), extra=extra)  # fmt: skip


async def admitted(
    stages: SessionStages,
    object_id: str,
    attempt: Callable[[str], Awaitable[Opened]],
    deadline_s: float,
    on_wait: Callable[[], None] | None,
) -> Opened:
    """`attempt(routing_id)` until the stages admit the session. A replica at capacity, or one
    lost (or silent) under the call, is answered by trying again under a new routing id
    (another replica, most likely), with backoff, until `deadline_s` has passed; `on_wait` is
    called before each wait for capacity."""
    started, delay, lost = time.monotonic(), 0.05, 0
    while True:
        try:
            return await attempt(f"{object_id}.{uuid.uuid4().hex[:8]}")
        except (AtCapacity, ReplicaLost) as err:
            await stages.release()
            if isinstance(err, ReplicaLost):  # tried again a few times, whatever the deadline
                lost += 1
                log.warning("opening %s: %s; trying again", object_id, err.message)
                if lost > OPEN_ATTEMPTS_LOST:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if time.monotonic() - started > deadline_s:
                raise
            if on_wait is not None:
                on_wait()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class SessionDriver:
    """Opens, runs, seals and frees one session across the stage deployments."""

    lookahead = 2  # chunks denoised ahead of the slowest consumer

    def __init__(
        self,
        handles: StageHandles,
        plan: SessionPlan,
        durability: Durability | None = None,
        on_restore: Callable[[StageName, float], None] | None = None,
        snapshot: stages_pb2.SessionSnapshot | None = None,
    ) -> None:
        """A new session, or (`snapshot`) one to `resume` where its snapshot stands."""
        plan = replace(plan, step_workers=getattr(handles, "step_workers", 0))
        self.plan = plan
        self.stages = SessionStages(handles, plan)
        durability = durability or Durability()
        self.durability = durability
        self.store = durability.store
        sizes = (durability.window_chunks, durability.decode_frames, self.lookahead,
                 durability.replay_chunks)  # fmt: skip
        self.record = (
            SessionRecord(plan, *sizes)
            if snapshot is None
            else SessionRecord.from_snapshot(plan, snapshot, *sizes)
        )
        self.restorer = Restorer(self.stages, self.record, on_restore)
        self.work = ChunkWork(self.stages, self.record, self.restorer, durability)
        self.lifecycle = Lifecycle(
            SessionStatus.OPENING, SESSION_TRANSITIONS, f"session {plan.object_id}"
        )
        self.end_reason: EndReason | None = None
        self.prompts = PromptVersions()
        self.kv_bytes = 0  # cache bytes the denoisers hold for the session once open
        self.init_segment = b""
        self.next_chunk = 0  # first chunk whose denoising has not started
        self.first_chunk_seconds: float | None = None
        self.on_restore = on_restore or (lambda stage, seconds: None)
        self.resumed_from = snapshot.spec.session_id if snapshot is not None else ""
        self.settling = False  # see settle()

    @property
    def status(self) -> SessionStatus:
        return self.lifecycle.status

    @property
    def session_id(self) -> str:
        """The routing id the stages know the session by (a new one per capacity retry)."""
        return self.stages.session_id

    @property
    def cache_bytes(self) -> int:
        """KV bytes the denoising stages hold for this session right now."""
        return self.kv_bytes if set(self.plan.denoisers) & set(self.stages.held) else 0

    @property
    def tenant(self) -> str:
        return self.plan.tenant

    async def open(
        self, deadline_s: float = 600.0, on_wait: Callable[[], None] | None = None
    ) -> None:
        """Encode the prompt and open the session on every stage, waiting for capacity (see
        `admitted`)."""
        context = await self.stages.encode(self.plan.prompt)
        self.record.prompt(0, 0, self.plan.prompt, context)
        opened = await admitted(
            self.stages, self.plan.object_id, lambda rid: self.stages.open(rid, context),
            deadline_s, on_wait,
        )  # fmt: skip
        self.kv_bytes, self.init_segment = opened.kv_bytes, opened.init_segment
        self.stages.beat(self.durability.heartbeat_s)
        self.lifecycle.to(SessionStatus.RUNNING)

    async def resume(
        self, deadline_s: float = 600.0, on_wait: Callable[[], None] | None = None
    ) -> None:
        """Take the session up where its record stands (a record from a snapshot, whose driver
        is gone): every stage rebuilt from it, waiting for capacity as `open` does. Chunks
        then go on from the first one not decoded."""
        record = self.record
        if len(record.contexts) < len(record.prompts):  # a snapshot keeps the prompts' text
            record.contexts = [await self.stages.encode(p.prompt) for p in record.prompts]
        self.prompts.take_up(record)
        try:  # where it was: the stages may still keep it as it stood (nothing to rebuild)
            opened = await self.stages.resume(self.resumed_from, record)
        except (AtCapacity, SessionNotHeld):
            await self.stages.release()
            opened = await admitted(
                self.stages, self.plan.object_id, lambda rid: self.stages.resume(rid, record),
                deadline_s, on_wait,
            )  # fmt: skip
        for stage, seconds in opened.rebuilt.items():
            self.on_restore(stage, seconds)
        self.kv_bytes, self.init_segment = opened.kv_bytes, opened.init_segment
        self.next_chunk = record.decoded
        self.stages.beat(self.durability.heartbeat_s)
        self.lifecycle.to(SessionStatus.RUNNING)

    def settle(self) -> None:
        """Start no more chunks: when `chunks()` is closed, the chunks already started are
        finished first (decoded, stored, snapshotted; up to `Durability.settle_s`), so that a
        suspended session's stages stand exactly where its snapshot does."""
        self.settling = True

    async def update_prompt(self, update: PromptUpdate | str) -> tuple[int, int]:
        """Queue a new prompt (a transition, or a plain text: a cut); returns (its version,
        the chunk it applies from)."""
        if isinstance(update, str):
            update = PromptUpdate(update)
        if update.recache and not self.plan.shape.mode.sliding_window:
            raise InvalidArgument(
                f"recache needs a sliding-window mode; this session's "
                f"{self.plan.shape.mode.name!r} keeps every frame in its cache",
                param="recache",
            )
        if self.status not in (SessionStatus.OPENING, SessionStatus.RUNNING):
            raise InvalidArgument(f"the session is {self.status}; no prompt can apply", "prompt")
        if self.next_chunk >= self.plan.shape.num_chunks:
            raise InvalidArgument(
                f"all {self.plan.shape.num_chunks} chunks are already generated; "
                "no chunk is left to apply a new prompt to",
                param="prompt",
            )
        context = await self.stages.encode(update.text)
        return await asyncio.shield(self.prompts.submit(context, update))

    async def chunks(self) -> AsyncIterator[ChunkReady]:
        """Generate every chunk from `next_chunk` on (0, or where a resume took up); yields
        decoded chunks in order as soon as each is ready."""
        if self.status != SessionStatus.RUNNING:
            raise RuntimeError(f"chunks() of a session that is {self.status}, not running")
        started = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue()
        # a permit per chunk from its denoising until its event is consumed: the chunk being
        # consumed and at most `lookahead` more
        ahead = asyncio.Semaphore(self.lookahead + 1)
        decodes: list[asyncio.Task] = []

        # HiAR on step workers: chunks overlap, each waiting only for its workers' turns
        wave = self.work.wavefront() if self.plan.pipelined else None

        async def produce() -> None:
            previous = None
            try:
                for index in range(self.next_chunk, self.plan.shape.num_chunks):
                    await ahead.acquire()
                    if self.settling:
                        return
                    if wave is not None and (
                        self.prompts.pending or self.record.text_changes(index)
                    ):
                        await wave.drain()  # a new prompt (or blend) applies between chunks
                    await self.work.apply_prompt(index, self.prompts)
                    self.next_chunk = index + 1
                    version = self.prompts.current
                    if wave is None:
                        out, denoise_s = await self.work.denoise(index)
                    else:
                        out, denoise_s = wave.submit(index), 0.0
                    decoded = self.work.decode(out, previous, version, denoise_s, self.kv_bytes)
                    task = asyncio.create_task(decoded)
                    decodes.append(task)
                    previous = task
                    queue.put_nowait(task)
                    if wave is not None:
                        await wave.admitted(index)
                if wave is not None:
                    await wave.drain()
                # the caches are not needed past the last chunk
                await self.stages.release(list(self.plan.denoisers))
                queue.put_nowait(None)
            except asyncio.CancelledError:
                if wave is not None:
                    wave.cancel()
                raise
            except BaseException as err:
                queue.put_nowait(err)

        producer = asyncio.create_task(produce())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                # a stop may settle it (see settle), so it is shielded from our cancellation
                event = await asyncio.shield(awaited(
                    item, f"session {self.session_id}",
                    lambda: [producer, *decodes], self.plan.log_ids(),
                ))  # fmt: skip
                if self.first_chunk_seconds is None:
                    self.first_chunk_seconds = time.perf_counter() - started
                # finished decodes (and the chunks they hold) go: an endless session's memory
                # stays that of the chunks in flight
                decodes[:] = [task for task in decodes if not task.done()]
                yield event
                ahead.release()
        finally:
            if self.settling:  # finish the chunks already started (see settle)
                for _ in range(self.lookahead + 1):
                    ahead.release()

                async def started_work() -> None:
                    await producer  # may start one more decode
                    await asyncio.gather(*decodes)

                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(started_work(), self.durability.settle_s)
            producer.cancel()
            if wave is not None:  # chunks still in flight on the step workers stop too
                wave.cancel()
            for task in decodes:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(producer, *decodes, return_exceptions=True)
            self.prompts.abandon()

    async def finish(
        self,
        reason: EndReason = EndReason.COMPLETED,
        video: stages_pb2.VideoMetadata | None = None,
    ) -> int:
        """Seal the media (an MP4 + manifest for videos, ENDLIST for sessions) and free every
        stage; returns the number of frames sealed."""
        self.lifecycle.to(SessionStatus.FINISHING)
        frames = await self.restorer.retried(
            lambda: self.stages.finish(video), self.restorer.decoder
        )
        await self.stages.release()
        await self._forget()
        if self.lifecycle.allows(SessionStatus.ENDED):  # else closed meanwhile, by a disconnect
            self.end_reason = reason
            self.lifecycle.to(SessionStatus.ENDED)
        return frames

    async def close(self, reason: EndReason = EndReason.CLOSED) -> None:
        """Free the session on every stage that holds it; ends it unsealed unless it has
        already ended. Idempotent, never raises."""
        if not self.lifecycle.terminal:
            failed = reason == EndReason.FAILED
            self.lifecycle.to(SessionStatus.FAILED if failed else SessionStatus.CLOSED)
            self.end_reason = reason
        await self.stages.release()
        await self._forget()

    @property
    def taking_up(self) -> bool:
        """A resume still opening: the session stands where its snapshot does."""
        return self.status == SessionStatus.OPENING and bool(self.resumed_from)

    async def suspend(self, reason: EndReason, resumable_s: float, keep_s: float = 0.0) -> None:
        """Stop here to go on later from the snapshot (a drain, a client gone away): the
        media stays open, the snapshot is kept, resumable for `resumable_s`; the stages keep
        the session's state `keep_s` seconds (a resume within it takes it up as is), then free
        it. A new session still opening has nothing to go on from: closed instead. A resume
        still opening (its client gone again, or another resume taking over) stands where its
        snapshot does: suspended, that snapshot kept, never the session lost."""
        if (self.status != SessionStatus.RUNNING and not self.taking_up) or self.store is None:
            await self.close(reason)
            return
        self.lifecycle.to(SessionStatus.SUSPENDED)
        self.end_reason = reason
        await self.stages.release(suspend=True, keep_s=keep_s)
        routing = self.session_id or self.resumed_from  # stopped before a stage was asked
        snapshot = self.record.snapshot(self.record.decoded, routing)
        snapshot.resumable_until = int(time.time() + resumable_s)
        await self.store.save(snapshot, str(self.plan.kind))

    async def _forget(self) -> None:
        """An ended session's snapshot goes (never raises: storage may be what failed); a
        suspended one's stays, to go on from."""
        if self.store is not None and self.status != SessionStatus.SUSPENDED:
            try:
                await self.store.delete(str(self.plan.kind), self.plan.object_id, self.plan.tenant)
            except Exception:
                log.exception(
                    "could not delete the snapshot of %s", self.plan.object_id,
                    extra=self.plan.log_ids(),
                )  # fmt: skip
