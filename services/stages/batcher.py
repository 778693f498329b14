"""Cross-session batching on a denoising replica: phases of different sessions that share a
`batch_key` (same passes over latents of one shape) run as one batched pass sequence
(`histream_model.schedules.execute.run_phase_batch`), each session's result bit for bit what it
gets alone.

Our own micro-batcher rather than Serve's `@serve.batch`: only phases with equal keys may share
a pass, so waiting work is grouped by key (`@serve.batch` batches any calls of one method), and
a phase runs under its session's lock, inside `RunPhase`, which `@serve.batch` would split from
the batch. Batches form continuously, one key at a time: while a key's batch runs (in a worker
thread), phases of that key that arrive wait and go in its next batch (up to `max_size`, oldest
first); phases of other keys run beside it, as unbatched phases of different sessions do, so a
mix of sessions that cannot share passes is not serialised behind one another. `wait_s` (0 by
default) lets a batch wait a little longer for company.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

J = TypeVar("J")  # one phase's work
R = TypeVar("R")  # its result


@dataclass
class _Waiting(Generic[J, R]):
    key: Hashable
    job: J
    future: asyncio.Future[R]


@dataclass
class BatchStats:
    batches: int = 0  # batched pass sequences run
    phases: int = 0  # phases they held
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many ran

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "batched_phases": self.phases,
            "largest_batch": self.largest,
        }


class PhaseBatcher(Generic[J, R]):
    """Runs `run(jobs)` (in a worker thread) on batches of jobs with one key; `run` returns one
    result per job, in order."""

    def __init__(self, run: Callable[[list[J]], list[R]], max_size: int, wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size={max_size} must be >= 1")
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.waiting: list[_Waiting[J, R]] = []
        self.stats = BatchStats()
        self._drains: dict[Hashable, asyncio.Task] = {}  # the running drain of each key

    async def submit(self, key: Hashable, job: J) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(key, job, future))
        drain = self._drains.get(key)
        if drain is None or drain.done():
            self._drains[key] = asyncio.create_task(self._drain(key))
        return await future

    def _next_batch(self, key: Hashable) -> list[_Waiting[J, R]]:
        batch = [w for w in self.waiting if w.key == key][: self.max_size]
        taken = {id(w) for w in batch}
        self.waiting = [w for w in self.waiting if id(w) not in taken]
        return batch

    async def _drain(self, key: Hashable) -> None:
        while any(w.key == key for w in self.waiting):
            if self.wait_s:
                await asyncio.sleep(self.wait_s)
            batch = [w for w in self._next_batch(key) if not w.future.done()]  # cancelled: gone
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run, [w.job for w in batch])
            except Exception as err:  # every member learns what failed (caches may be part-written)
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(err)
                continue
            self.stats.batches += 1
            self.stats.phases += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
            for w, result in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(result)
