"""Batches of the OpenAI Batch API shape: many `/v1/videos` requests from one uploaded JSONL
file, run as ordinary video jobs (the same runner, stages and quotas as single videos), a few
at a time per tenant, and written to an output file and an error file at the end.

A batch's progress lives in its record (`tenants/<t>/batches/<id>/record.json`): every line's
video id once submitted and its outcome once known. The gateway replica running a batch holds
a lease on it, renewed like a job's; when the lease runs out (the replica died, the service
restarted), any replica takes the batch up from its record: lines already finished are not
done again, lines whose video was submitted wait for that video (a job that itself survives),
the rest are submitted. Lifecycle: validating -> in_progress -> finalizing -> completed, or
-> cancelling -> cancelled (no new line starts; those under way finish and are reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

from pydantic import BaseModel, Field

from services.errors import NotFound, QueueFull, QuotaExceeded, ServiceError
from services.jobs.files import FileStore
from services.jobs.leases import CLAIM_SETTLE_S
from services.jobs.records import RecordStore, VideoError, VideoRecord, VideoStatus, new_video_id
from services.logs import ids
from services.sessions.periodic import Periodic
from services.storage import ObjectNotFound

log = logging.getLogger("histream.jobs")


class BatchStatus(enum.StrEnum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


UNFINISHED = {
    BatchStatus.validating,
    BatchStatus.in_progress,
    BatchStatus.finalizing,
    BatchStatus.cancelling,
}


class BatchLine(BaseModel):
    """One request of the input file: its line number (1-based), its custom_id, its body
    (checked when the batch was created); then its video and how it ended."""

    line: int
    custom_id: str
    body: dict = Field(default_factory=dict)
    video_id: str | None = None  # chosen and saved before the video is submitted
    status: str = "pending"  # pending, submitted, completed, failed
    error: VideoError | None = None
    status_code: int = 200  # the HTTP status a failed line's request got


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchRecord(BaseModel):
    """As stored; `public()` is the OpenAI batch object."""

    id: str
    object: str = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus = BatchStatus.validating
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    errors: dict | None = None
    tenant: str
    owner: str = ""
    lease_until: int = 0
    lines: list[BatchLine] = Field(default_factory=list)

    def public(self) -> dict:
        return self.model_dump(mode="json", exclude={"tenant", "owner", "lease_until", "lines"})

    def count(self) -> None:
        done = [line for line in self.lines if line.status in ("completed", "failed")]
        self.request_counts = RequestCounts(
            total=len(self.lines),
            completed=sum(line.status == "completed" for line in done),
            failed=sum(line.status == "failed" for line in done),
        )


def new_batch_id() -> str:
    return f"batch_{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


class BatchStore:
    def __init__(self, records: RecordStore) -> None:
        self.records = records

    def for_tenant(self, tenant: str) -> BatchStore:
        return BatchStore(self.records.for_tenant(tenant))

    async def put(self, batch: BatchRecord) -> None:
        """Store the batch: marked unfinished before its first write, unmarked once its record
        says it ended (services.jobs.marks)."""
        key = self.records.layout.batch_record_key(batch.id)
        data = batch.model_dump_json().encode()
        marks = self.records.batch_marks
        if batch.status == BatchStatus.validating:
            await marks.mark(batch.id)
        await self.records.storage_call(self.records.storage.put, key, data, "application/json")
        if batch.status not in UNFINISHED:
            await marks.unmark(batch.id)

    async def get(self, batch_id: str) -> BatchRecord:
        try:
            key = self.records.layout.batch_record_key(batch_id)
            data = await self.records.storage_call(self.records.storage.get, key)
        except (ObjectNotFound, ValueError):
            raise NotFound(f"no batch with id {batch_id!r}", param="batch_id") from None
        return BatchRecord.model_validate_json(data)

    async def ids(self) -> list[str]:
        prefix = self.records.layout.batches_prefix()
        keys = await self.records.storage_call(self.records.storage.list, prefix)
        return sorted(k.rsplit("/", 2)[-2] for k in keys if k.endswith("/record.json"))

    async def unfinished(self) -> list[BatchRecord]:
        """The tenant's unfinished batches, found by their marks (the first call in a process
        reads every batch once)."""

        async def every() -> list[BatchRecord]:
            found = []
            for batch_id in await self.ids():
                with contextlib.suppress(NotFound):
                    found.append(await self.get(batch_id))
            return found

        marks = self.records.batch_marks
        return await marks.search(self.get, lambda b: b.status in UNFINISHED, every, lambda b: b.id)


Submit = Callable[[dict, str, str], Awaitable[VideoRecord]]  # (body, tenant, video id)


class BatchRunner(Periodic):
    """Runs batches on this gateway replica; as a `Periodic`, renews their leases and takes up
    batches whose lease ran out (every `lease_s / 3`)."""

    def __init__(
        self,
        submit: Submit,
        records: RecordStore,
        files: FileStore,
        lease_s: float,
        concurrency: int,
        tenants: Callable[[], Iterable[str]] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.submit = submit  # validates a line's body and queues its video job
        self.records = records
        self.batches = BatchStore(records)
        self.files = files
        self.lease_s = lease_s
        self.period_s = max(0.5, lease_s / 3)
        self.concurrency = concurrency
        self.tenants = tenants or (lambda: [records.layout.tenant])
        self.poll_s = poll_s
        self.owner = f"batches_{uuid.uuid4().hex[:12]}"
        self.tasks: dict[str, asyncio.Task] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._running: dict[str, BatchRecord] = {}

    def slots(self, tenant: str) -> asyncio.Semaphore:
        """The tenant's videos from batches under way on this replica, at most `concurrency`
        at once, whatever the number of its batches (streaming keeps its capacity)."""
        if tenant not in self._slots:
            self._slots[tenant] = asyncio.Semaphore(self.concurrency)
        return self._slots[tenant]

    async def drain(self) -> None:
        """Shutting down: stop running batches and give up their leases, so that another
        replica (or this service started again) takes them up at once."""
        self.stop()
        running = list(self._running.values())
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for batch in running:
            batch.lease_until = 0
            with contextlib.suppress(Exception):
                await self._save(batch)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def cancel_here(self, batch_id: str) -> bool:
        """A batch running here stops starting lines (its record says cancelling already)."""
        batch = self._running.get(batch_id)
        if batch is None:
            return False
        if batch.status in (BatchStatus.in_progress, BatchStatus.validating):
            batch.status, batch.cancelling_at = BatchStatus.cancelling, int(time.time())
        return True

    def start_batch(self, batch: BatchRecord) -> None:
        self.start()  # lease renewal and adoption run while there is anything to run
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self.tasks[batch.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(batch.id, None))

    async def tick(self) -> None:
        await self.renew()
        await self.adopt()

    async def renew(self) -> None:
        for batch in list(self._running.values()):
            batch.lease_until = int(time.time() + self.lease_s)
            with contextlib.suppress(Exception):
                await self._save(batch)

    async def adopt(self) -> list[str]:
        """Take up every unfinished batch whose lease ran out; returns their ids."""
        taken = []
        for tenant in self.tenants():
            store = self.batches.for_tenant(tenant)
            for batch in await store.unfinished():
                if batch.id in self.tasks or batch.lease_until >= time.time():
                    continue
                with contextlib.suppress(NotFound):
                    claimed = await self._claim(store, batch)
                    if claimed is not None:
                        log.info("taking up batch %s", batch.id, extra=ids(tenant))
                        self.start_batch(claimed)
                        taken.append(batch.id)
        return taken

    async def _claim(self, store: BatchStore, batch: BatchRecord) -> BatchRecord | None:
        batch.owner, batch.lease_until = self.owner, int(time.time() + self.lease_s)
        await store.put(batch)
        await asyncio.sleep(CLAIM_SETTLE_S)
        again = await store.get(batch.id)
        return again if again.owner == self.owner else None

    async def _save(self, batch: BatchRecord) -> None:
        """Write the batch's progress, keeping a cancel another replica wrote meanwhile."""
        store = self.batches.for_tenant(batch.tenant)
        with contextlib.suppress(NotFound):
            stored = await store.get(batch.id)
            if stored.status == BatchStatus.cancelling and batch.status in (
                BatchStatus.in_progress,
                BatchStatus.validating,
            ):
                batch.status, batch.cancelling_at = stored.status, stored.cancelling_at
        batch.count()
        await store.put(batch)

    async def _run(self, batch: BatchRecord) -> None:
        self._running[batch.id] = batch
        try:
            if batch.status == BatchStatus.validating:
                batch.status, batch.in_progress_at = BatchStatus.in_progress, int(time.time())
            await self._save(batch)
            lines = [line for line in batch.lines if line.status in ("pending", "submitted")]
            await asyncio.gather(*(self._line(batch, line) for line in lines))
            await self._finish(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped; another replica takes it up", batch.id)
        finally:
            self._running.pop(batch.id, None)

    async def _line(self, batch: BatchRecord, line: BatchLine) -> None:
        records = self.records.for_tenant(batch.tenant)
        async with self.slots(batch.tenant):
            if line.status == "pending":
                if batch.status == BatchStatus.cancelling:
                    return
                if not await self._submit(batch, line):
                    return
            while True:  # the video is a job: it runs (or is taken up) wherever it can
                try:
                    video = await records.get(line.video_id or "")
                except NotFound:
                    line.status, line.status_code = "failed", 404
                    line.error = VideoError(code="not_found", message="the video was deleted")
                    break
                if video.status in (VideoStatus.completed, VideoStatus.failed):
                    line.status = video.status.value
                    line.error = video.error
                    line.status_code = 200 if video.status == VideoStatus.completed else 500
                    break
                await asyncio.sleep(self.poll_s)
            await self._save(batch)

    async def _submit(self, batch: BatchRecord, line: BatchLine) -> bool:
        """Queue the line's video (waiting while the tenant or the replica is at a limit);
        False when the line failed instead.

        The video's id is chosen and saved with the batch before the video is submitted, so a
        replica taking up the batch after one died between the two finds that video instead of
        making the line's video twice."""
        records = self.records.for_tenant(batch.tenant)
        if line.video_id is None:
            line.video_id = new_video_id()
            await self._save(batch)
        else:
            with contextlib.suppress(NotFound):
                await records.get(line.video_id)
                line.status = "submitted"  # the replica before submitted it, then stopped
                await self._save(batch)
                return True
        while True:
            try:
                video = await self.submit(line.body, batch.tenant, line.video_id)
            except (QuotaExceeded, QueueFull) as err:
                wait = getattr(err, "retry_after_s", None)
                if wait is None:  # the request itself is over a limit: waiting cannot help
                    self._fail(line, err)
                    break
                await asyncio.sleep(wait)
                continue
            except ServiceError as err:
                self._fail(line, err)
                break
            line.video_id, line.status = video.id, "submitted"
            await self._save(batch)
            return True
        await self._save(batch)
        return False

    @staticmethod
    def _fail(line: BatchLine, err: ServiceError) -> None:
        line.video_id = None  # chosen, never made
        line.status, line.status_code = "failed", err.http_status
        line.error = VideoError(code=err.code, message=err.message)

    async def _finish(self, batch: BatchRecord) -> None:
        cancelled = batch.status == BatchStatus.cancelling
        batch.status, batch.finalizing_at = BatchStatus.finalizing, int(time.time())
        await self._save(batch)
        files = self.files.for_tenant(batch.tenant)
        records = self.records.for_tenant(batch.tenant)
        output, errors = [], []
        for line in batch.lines:
            request_id = f"batch_req_{batch.id.removeprefix('batch_')}_{line.line}"
            if line.status == "completed" and line.video_id:
                with contextlib.suppress(NotFound):
                    video = (await records.get(line.video_id)).public()
                    video["content_url"] = f"/v1/videos/{line.video_id}/content"
                    response = {"status_code": 200, "request_id": request_id, "body": video}
                    output.append({"id": request_id, "custom_id": line.custom_id,
                                   "response": response, "error": None})  # fmt: skip
                    continue
            if line.status in ("completed", "failed"):
                error = line.error or VideoError(code="not_found", message="the video is gone")
                errors.append({
                    "id": request_id, "custom_id": line.custom_id,
                    "response": {"status_code": line.status_code, "request_id": request_id,
                                 "body": {"video_id": line.video_id}},
                    "error": {**error.model_dump(), "line": line.line},
                })  # fmt: skip
        name = batch.id
        if output:
            data = "".join(json.dumps(o) + "\n" for o in output).encode()
            made = await files.create(f"{name}_output.jsonl", "batch_output", data)
            batch.output_file_id = made.id
        if errors:
            data = "".join(json.dumps(e) + "\n" for e in errors).encode()
            made = await files.create(f"{name}_errors.jsonl", "batch_output", data)
            batch.error_file_id = made.id
        now = int(time.time())
        if cancelled:
            batch.status, batch.cancelled_at = BatchStatus.cancelled, now
        else:
            batch.status, batch.completed_at = BatchStatus.completed, now
        batch.count()
        await self.batches.for_tenant(batch.tenant).put(batch)
        log.info(
            "batch %s %s: %d completed, %d failed", batch.id, batch.status,
            batch.request_counts.completed, batch.request_counts.failed, extra=ids(batch.tenant),
        )  # fmt: skip
