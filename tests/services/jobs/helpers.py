"""A job runner over records in a local directory, with the stages in this process (real or
fake), for the Ray-free job tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from histream_model.config import get_preset
from services.jobs import JobRunner, RecordStore, VideoRecord, VideoStatus
from services.protocol import Generation, video_shape
from services.sessions import Durability, SnapshotStore
from services.settings import ServeSettings
from services.storage import Layout, LocalStorage
from tests.services.fakes import Journal

TTL_S = 3600
NOTHING_HELD = {"structure": 0, "refine": 0, "decode": 0}


class RecordingStorage(LocalStorage):
    """Local storage that remembers (status, progress) of every job record it stores, and wakes
    the journal's waiters when it does (the record store calls it from worker threads)."""

    def __init__(self, root, journal: Journal) -> None:
        super().__init__(root)
        self.records: list[tuple[str, int]] = []
        self.journal = journal
        self.loop: asyncio.AbstractEventLoop | None = None  # set once the test's loop runs
        self.on_exists: Callable[[str], None] | None = None  # runs after the next exists()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        super().put(key, data, content_type)
        if key.endswith("/record.json"):
            record = VideoRecord.model_validate_json(data)
            self.records.append((record.status.value, record.progress))
            self.wake()

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        hook, self.on_exists = self.on_exists, None
        if hook is not None:
            hook(key)
        return found

    def wake(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.journal.notify)


class Observer:
    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.ended: list[VideoStatus] = []
        self.restores: list = []
        self.drivers: list = []

    def running(self, driver):
        self.drivers.append(driver)
        return contextlib.nullcontext()

    def chunk(self, chunk) -> None:
        self.chunks.append(chunk.index)

    def finished(self, status) -> None:
        self.ended.append(status)

    def restored(self, stage, seconds) -> None:
        self.restores.append(stage)


class Jobs:
    def __init__(
        self,
        tmp_path,
        stages,
        max_running: int = 2,
        queue_timeout_s: float = 60,
        max_queued: int = 256,
        snapshots: bool = False,
        storage: RecordingStorage | None = None,
        **settings: object,
    ):
        """A runner over records in `tmp_path/store` (or `storage`, to share it with another
        runner as two gateway replicas do); `snapshots`: its jobs keep snapshots there."""
        self.storage = storage or RecordingStorage(tmp_path / "store", stages.journal)
        self.records = RecordStore(self.storage, Layout())
        self.stages = stages
        self.observer = Observer()
        self.settings = ServeSettings(
            preset="tiny",
            max_running_jobs=max_running,
            max_queued_jobs=max_queued,
            queue_timeout_s=queue_timeout_s,
            video_ttl_s=TTL_S,
            **settings,
        )
        store = SnapshotStore(self.storage, Layout()) if snapshots else None
        self.runner = JobRunner(
            stages.handles,
            self.records,
            self.settings,
            observer=self.observer,
            durability=Durability(store=store),
        )

    async def submit(self, seed: int = 5, frames: int = 21) -> tuple[VideoRecord, asyncio.Task]:
        self.storage.loop = asyncio.get_running_loop()
        shape = video_shape(get_preset("tiny"), "histream+", 64, 96, frames)
        generation = Generation(model="tiny", prompt="a cat", shape=shape, seed=seed, seconds="1")
        record = await self.runner.submit(generation)
        return record, self.runner.tasks[record.id]

    async def stored(self, status: str, progress: int) -> None:
        """Wait until the record was stored with this status and progress."""
        await self.stages.journal.until(lambda: (status, progress) in self.storage.records)

    def objects(self, video_id: str) -> list[str]:
        prefix = Layout().video_prefix(video_id)
        return sorted(k.removeprefix(prefix) for k in self.storage.list(prefix))
