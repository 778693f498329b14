"""Video jobs that outlive their gateway replica.

Each queued or running job's record carries its replica (`owner`) and a lease (`lease_until`)
that the replica renews every third of `job_lease_s`. A record whose lease ran out belongs to a
replica that died, or to a service that was restarted (a drain gives its jobs' leases up at
once): every gateway replica's `Adopter` looks for such records and takes them up, from the
job's snapshot (its last decoded chunk) or, when it never decoded one, from the start. A job
taken up `max_job_attempts` times in all fails with `job_interrupted`, so no record stays
queued or in_progress forever.

Storage has no compare-and-swap: a replica claims a record by writing itself as owner, waits
`CLAIM_SETTLE_S`, and reads the record back; of replicas that claimed at once, only the last
writer finds itself there and runs the job. A claim landing just after the job's delete finds
the delete's tombstone (RecordStore.put_unless_deleted) and takes nothing up; the adopters also
remove tombstones older than `TOMBSTONE_TTL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from histream_model.config import Preset
from protos.histream.v1 import stages_pb2
from services.jobs.records import UNFINISHED, RecordStore, VideoError, VideoRecord, VideoStatus
from services.logs import ids
from services.protocol import Generation, StreamKind, video_shape
from services.sessions import SessionPlan, SnapshotStore
from services.sessions.periodic import Periodic
from services.sessions.resume import plan_of
from services.storage import VideoParts

log = logging.getLogger("histream.jobs")
CLAIM_SETTLE_S = 1.0
TOMBSTONE_TTL_S = 3600.0  # how long a deleted video's tombstone is kept
TOMBSTONE_SWEEP_S = 600.0  # how often a replica removes older ones


def plan_of_record(
    record: VideoRecord, preset: Preset, fps: int, snapshot: stages_pb2.SessionSnapshot | None
) -> SessionPlan:
    """The session a job's record (and its snapshot, once it has one) describes."""
    if snapshot is not None:
        return plan_of(snapshot, preset)
    width, height = (int(n) for n in record.size.split("x"))
    shape = video_shape(preset, record.mode, height, width, record.num_frames)
    generation = Generation(record.model, record.prompt, shape, record.seed, record.seconds)
    return SessionPlan.of(generation, record.id, StreamKind.VIDEO, record.tenant, fps)


def expired(record: VideoRecord, now: float) -> bool:
    """An unfinished job nobody holds: its replica stopped renewing its lease."""
    return record.status in UNFINISHED and record.lease_until < now


class Adopter(Periodic):
    """Takes up, on this gateway replica, the jobs whose replica is gone (see the module)."""

    def __init__(
        self,
        records: RecordStore,
        runner,
        store: SnapshotStore | None,
        max_attempts: int,
        tenants: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.records = records
        # whose records to look through: every tenant that can call
        self.tenants = tenants or (lambda: [records.layout.tenant])
        self.runner = runner  # services.jobs.runner.JobRunner
        self.store = store
        self.max_attempts = max_attempts
        self.period_s = max(0.5, runner.lease_s / 3)
        self.next_tombstone_sweep = 0.0  # monotonic time of the next tombstone sweep

    async def tick(self) -> None:
        await self.runner.renew()
        await self.sweep()
        if time.monotonic() >= self.next_tombstone_sweep:
            self.next_tombstone_sweep = time.monotonic() + TOMBSTONE_SWEEP_S
            await self.sweep_tombstones()

    async def sweep_tombstones(self) -> int:
        """Remove deleted videos' tombstones older than TOMBSTONE_TTL_S (services.storage's
        `delete_video`); returns how many."""
        swept = 0
        for tenant in self.tenants():
            swept += await self.records.for_tenant(tenant).sweep_tombstones(TOMBSTONE_TTL_S)
        return swept

    async def sweep(self) -> list[str]:
        """Take up every job whose lease ran out; returns their ids."""
        if self.runner.draining:
            return []
        taken = []
        unfinished = []
        for tenant in self.tenants():
            unfinished += await self.records.for_tenant(tenant).unfinished()
        for record in unfinished:
            if record.id in self.runner.tasks or not expired(record, time.time()):
                continue
            claimed = await self._claim(record)
            if claimed is None:
                continue
            taken.append(record.id)
            if claimed.attempts > self.max_attempts:
                await self._give_up(claimed)
                continue
            snapshot = None
            if claimed.status == VideoStatus.in_progress and self.store is not None:
                video = str(StreamKind.VIDEO)
                snapshot = await self.store.load(video, claimed.id, claimed.tenant)
            log.info(
                "taking up video %s (attempt %d) %s", claimed.id, claimed.attempts,
                f"at chunk {snapshot.next_chunk}" if snapshot else "from the start",
                extra=ids(claimed.tenant, video_id=claimed.id),
            )  # fmt: skip
            self.runner.adopt(claimed, snapshot)
        return taken

    async def _claim(self, record: VideoRecord) -> VideoRecord | None:
        """The record, if this replica's claim on it held (see the module)."""
        record.owner = self.runner.owner
        record.lease_until = int(time.time() + self.runner.lease_s)
        record.attempts += 1
        records = self.records.for_tenant(record.tenant)
        if not await records.put_unless_deleted(record):  # deleted as it was claimed
            return None
        await asyncio.sleep(CLAIM_SETTLE_S)
        with contextlib.suppress(Exception):
            again = await records.get(record.id)
            if again.owner == self.runner.owner and again.status in UNFINISHED:
                return again
        return None

    async def _give_up(self, record: VideoRecord) -> None:
        record.advance(VideoStatus.failed)
        record.error = VideoError(
            code="job_interrupted",
            message=f"video {record.id} was interrupted {record.attempts - 1} times (its "
            "gateway replica or the service stopped while it ran); submit it again",
        )
        records = self.records.for_tenant(record.tenant)
        if not await records.put_unless_deleted(record):
            return
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.delete(str(StreamKind.VIDEO), record.id, record.tenant)
        parts = VideoParts(records.storage, records.layout, record.id)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(parts.remove)
        log.warning(
            "video %s failed: interrupted %d times", record.id, record.attempts - 1,
            extra=ids(record.tenant, video_id=record.id),
        )  # fmt: skip
