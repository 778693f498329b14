"""The video jobs of one gateway replica: submitted, generated through a `SessionDriver` at most
`max_running` at a time, published (MP4, then manifest) by the decode pool, and cancellable.
Deleting a job cancels it if it is running and removes every object under its prefix."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from protos.histream.v1 import stages_pb2
from services.errors import Internal, QueueFull, QueueTimeout, ServiceError, Unavailable
from services.jobs.leases import Adopter, plan_of_record
from services.jobs.records import RecordStore, VideoError, VideoRecord, VideoStatus, new_video_id
from services.logs import ids
from services.protocol import ChunkReady, EndReason, Generation, StageName, StreamKind
from services.protocol.identity import replica_name
from services.sessions import Durability, SessionDriver, SessionPlan, StageHandles
from services.settings import ServeSettings

log = logging.getLogger("histream.jobs")


class JobObserver(Protocol):
    """Who watches the jobs, e.g. the gateway's metrics."""

    def running(self, driver: SessionDriver) -> AbstractContextManager:
        """Wraps a job's generation (from waiting for capacity to publishing)."""
        ...

    def chunk(self, chunk: ChunkReady) -> None:
        """Each chunk of a job as it is decoded."""
        ...

    def finished(self, status: VideoStatus) -> None: ...

    def restored(self, stage: StageName, seconds: float) -> None:
        """A stage rebuilt a job's session from its record (a replica was lost)."""
        ...


class _Unobserved:
    def running(self, driver: SessionDriver) -> AbstractContextManager:
        return contextlib.nullcontext()

    def chunk(self, chunk: ChunkReady) -> None:
        pass

    def finished(self, status: VideoStatus) -> None:
        pass

    def restored(self, stage: StageName, seconds: float) -> None:
        pass


class JobDeleted(Exception):
    """The job's record was deleted (by another gateway replica) while it ran."""


class JobRunner:
    """Runs this gateway replica's video jobs, at most `max_running` at a time."""

    def __init__(
        self,
        handles: StageHandles,
        records: RecordStore,
        settings: ServeSettings,
        observer: JobObserver | None = None,
        durability: Durability | None = None,
        tenants: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.handles = handles
        self.durability = durability or Durability()
        self.records = records
        self.preset = settings.get_preset()
        self.slots = asyncio.Semaphore(settings.max_running_jobs)
        self.max_queued = settings.max_queued_jobs  # jobs waiting for a slot, at most
        self.retry_after_s = settings.retry_after_s
        self.waiting = 0  # jobs submitted that do not hold a slot yet
        self.queue_timeout_s = settings.queue_timeout_s  # for a slot and stage capacity together
        self.ttl_s = settings.video_ttl_s  # a finished video's expires_at
        self.fps = settings.frame_rate
        self.observer = observer or _Unobserved()
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, VideoRecord] = {}  # the records of those jobs, leases renewed
        self.drivers: dict[str, SessionDriver] = {}  # their sessions, once running
        self._writes: dict[str, asyncio.Lock] = {}  # one record write at a time per job
        self.owner = replica_name()
        self.lease_s = settings.job_lease_s
        self.draining = False  # no new jobs; running ones are suspended, not cancelled
        # renews this replica's leases and takes up jobs whose replica is gone (leases.py)
        self.adopter = Adopter(
            records, self, self.durability.store, settings.max_job_attempts, tenants
        )

    async def submit(
        self, generation: Generation, tenant: str | None = None, video_id: str | None = None
    ) -> VideoRecord:
        """Store a queued record of `tenant`'s (the runner's own by default) and start the
        job; returns the record at once. QueueFull when `max_queued_jobs` jobs already wait
        for a slot on this replica. `video_id` (from `new_video_id`, chosen and saved by the
        caller beforehand) makes a retried submission findable: a batch line's."""
        if self.draining:
            raise Unavailable("this gateway replica is shutting down; submit the job again")
        if self.waiting >= self.max_queued:
            raise QueueFull(
                f"{self.waiting} video jobs are waiting on this gateway replica, its limit "
                f"(max_queued_jobs={self.max_queued}); retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        shape = generation.shape
        record = VideoRecord(
            id=video_id or new_video_id(),
            model=generation.model,
            created_at=int(time.time()),
            seconds=generation.seconds,
            size=f"{shape.width}x{shape.height}",
            prompt=generation.prompt,
            seed=generation.seed,
            mode=shape.mode.name,
            num_frames=shape.num_frames,
            tenant=tenant or self.records.layout.tenant,
            owner=self.owner,
            lease_until=int(time.time() + self.lease_s),
        )
        await self.records_of(record).put(record)
        plan = SessionPlan.of(generation, record.id, StreamKind.VIDEO, record.tenant, self.fps)
        self._start(record, plan, None)
        return record

    def adopt(self, record: VideoRecord, snapshot: stages_pb2.SessionSnapshot | None) -> None:
        """Run a job another replica left (services.jobs.leases): from its snapshot, or from
        the start. The queue limit does not apply: the job was accepted long ago."""
        self._start(record, plan_of_record(record, self.preset, self.fps, snapshot), snapshot)

    def _start(
        self,
        record: VideoRecord,
        plan: SessionPlan,
        snapshot: stages_pb2.SessionSnapshot | None,
    ) -> None:
        self.adopter.start()
        self.waiting += 1
        task = asyncio.create_task(self._run(record, plan, snapshot))
        self.tasks[record.id], self.live[record.id] = task, record
        self._writes[record.id] = asyncio.Lock()

        def done(_: asyncio.Task) -> None:
            for table in (self.tasks, self.live, self._writes, self.drivers):
                table.pop(record.id, None)

        task.add_done_callback(done)

    async def _update(self, record: VideoRecord, lease: bool = True) -> None:
        """Store the record (its lease renewed; `lease=False` gives it up) unless it was
        deleted meanwhile (JobDeleted)."""
        async with self._writes.get(record.id) or asyncio.Lock():
            records = self.records_of(record)
            if not await records.exists(record.id):
                raise JobDeleted(record.id)
            record.lease_until = int(time.time() + self.lease_s) if lease else 0
            if not await records.put_unless_deleted(record):  # a delete landed meanwhile
                raise JobDeleted(record.id)

    def records_of(self, record: VideoRecord) -> RecordStore:
        """Where the record of a job lives: under its tenant's prefix."""
        return self.records.for_tenant(record.tenant)

    async def renew(self) -> None:
        """Renew the lease of every job here; one whose record is gone is cancelled. Not while
        draining: a drain gives the leases up."""
        if self.draining:
            return
        for video_id, record in list(self.live.items()):
            try:
                await self._update(record)
            except JobDeleted:
                task = self.tasks.get(video_id)
                if task is not None:
                    task.cancel()

    async def _run(
        self,
        record: VideoRecord,
        plan: SessionPlan,
        snapshot: stages_pb2.SessionSnapshot | None,
    ) -> None:
        restored = self.observer.restored
        driver = SessionDriver(self.handles, plan, self.durability, restored, snapshot=snapshot)
        self.drivers[record.id] = driver
        reason = EndReason.FAILED
        try:
            async with self._slot(record.id) as deadline_s:
                with self.observer.running(driver):
                    await self._generate(record, plan, driver, deadline_s)
            now = int(time.time())
            record.advance(VideoStatus.completed)
            record.progress, record.completed_at, record.expires_at = 100, now, now + self.ttl_s
            await self._update(record)
            self.observer.finished(VideoStatus.completed)
            reason = EndReason.COMPLETED
        except asyncio.CancelledError:
            if self.draining:  # stopped to go on after a restart, from its snapshot
                log.info(
                    "video %s suspended by a drain at chunk %d", record.id, driver.next_chunk,
                    extra=ids(record.tenant, video_id=record.id),
                )  # fmt: skip
                durability = self.durability
                await driver.suspend(
                    EndReason.DRAINING, durability.snapshot_ttl_s, durability.resume_grace_s
                )
                with contextlib.suppress(Exception):  # any replica may take it up at once
                    await self._update(record, lease=False)
            else:
                log.info("video %s cancelled", record.id, extra=ids(record.tenant, None, record.id))
            reason = EndReason.CANCELLED
            raise
        except JobDeleted:
            log.info(
                "video %s was deleted while running; stopped", record.id,
                extra=ids(record.tenant, video_id=record.id),
            )  # fmt: skip
            reason = EndReason.CANCELLED
            with contextlib.suppress(Exception):  # what it published as the delete landed
                await self.records_of(record).delete(record.id)
        except Exception as err:
            code, message = _error_of(err, record.id)
            log.warning(
                "video %s failed: %s %s", record.id, code, message,
                extra=ids(record.tenant, video_id=record.id),
            )  # fmt: skip
            if record.status != VideoStatus.completed:
                record.advance(VideoStatus.failed)
                record.error = VideoError(code=code, message=message)
                with contextlib.suppress(Exception):
                    await self._update(record)
            self.observer.finished(VideoStatus.failed)
        finally:
            await driver.close(reason)

    @contextlib.asynccontextmanager
    async def _slot(self, video_id: str) -> AsyncIterator[float]:
        """Hold one of the `max_running_jobs` slots; gives the time left of the queue deadline
        to wait for stage capacity in."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise QueueTimeout(
                f"video {video_id} waited {self.queue_timeout_s:g} s for a job slot "
                "(queue_timeout_s); submit it again later"
            ) from None
        finally:
            self.waiting -= 1
        try:
            yield max(0.0, self.queue_timeout_s - (time.monotonic() - started))
        finally:
            self.slots.release()

    async def _generate(
        self, record: VideoRecord, plan: SessionPlan, driver: SessionDriver, deadline_s: float
    ) -> None:
        """Open the session (or take it up where its snapshot stands; waiting for capacity),
        generate every chunk, publish the MP4."""
        begin = driver.resume if driver.resumed_from else driver.open
        await begin(deadline_s=deadline_s)
        if record.status == VideoStatus.queued:
            record.advance(VideoStatus.in_progress)
        await self._update(record)
        total = plan.shape.num_chunks
        # closed here, not whenever it is collected: a drain landing while a record is
        # stored must still let the chunks started finish before the snapshot (see settle)
        async with contextlib.aclosing(driver.chunks()) as chunks:
            async for chunk in chunks:
                self.observer.chunk(chunk)
                record.progress = min(99, int(100 * (chunk.index + 1) / total))
                await self._update(record)
        if not await self.records_of(record).exists(record.id):
            raise JobDeleted(record.id)
        described = record.model_dump(include={"id", "model", "mode", "seed", "size", "created_at"})
        metadata = stages_pb2.VideoMetadata(fps=plan.fps, **described)
        await driver.finish(EndReason.COMPLETED, video=metadata)

    async def drain(self) -> int:
        """Stop every job here for a shutdown: each finishes the chunks it started and is
        suspended there (its record stays in_progress, its lease given up, its snapshot and
        stored parts kept to go on from; the stages keep its caches `resume_grace_s`, for a
        replica taking it up at once). Returns how many."""
        self.draining = True
        tasks = list(self.tasks.values())
        for video_id, task in list(self.tasks.items()):
            driver = self.drivers.get(video_id)
            if driver is not None:  # the chunks it started are finished first
                driver.settle()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def cancel(self, video_id: str) -> bool:
        """Cancel a job running on this replica; True if one was."""
        task = self.tasks.get(video_id)
        if task is None:
            return False
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return True


def _error_of(err: BaseException, video_id: str) -> tuple[str, str]:
    """What the record says of a failure: a service error as it is; anything else only an
    error id (its details, e.g. a replica's traceback, stay in the server log)."""
    if not isinstance(err, ServiceError):
        err = Internal.logged(log, err, f"generating video {video_id}")
    return err.code, err.message
