"""HiAR's pipeline on the step workers: one session's chunks in flight at once, chunk i on
worker w while chunk i + 1 is on worker w - 1 (histream_model/schedules/pipeline.py runs the same
wavefront in threads; the latents are the sequential run's, bit for bit).

Chunk i's phases of worker w start once worker w - 1 handed chunk i on and worker w finished
chunk i - 1: each worker still sees its chunks in order, so its stage's in-order check holds.
The last worker finishes chunks in order, and each is recorded then.

A stage that lost the session (its replica died, or its id now routes elsewhere) stops the whole
wavefront: the chunks in flight are cancelled, every worker is rebuilt from the record at the
first chunk not finished, and those chunks start again, until `Restorer.deadline_s` after the
first failure. Any other error fails every chunk not finished.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protos.histream.v1 import stages_pb2
from services.errors import SessionNotHeld
from services.sessions.record import SessionRecord
from services.sessions.remote import SessionStages
from services.sessions.restore import Restorer

log = logging.getLogger("histream.sessions")

Result = tuple[stages_pb2.ChunkLatents, float]  # a chunk's output and its denoising seconds


class Wavefront:
    def __init__(self, stages: SessionStages, record: SessionRecord, restorer: Restorer) -> None:
        self.stages, self.record, self.restorer = stages, record, restorer
        self.groups = stages.plan.workers  # phase indices per worker, in worker order
        self.base: int | None = None  # the first chunk of the current run of the wave
        self.events: dict[tuple[int, int], asyncio.Event] = {}  # (chunk, worker) finished
        self.results: dict[int, asyncio.Future] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.recovering: asyncio.Task | None = None
        self.first_failure: float | None = None

    def _event(self, chunk: int, worker: int) -> asyncio.Event:
        return self.events.setdefault((chunk, worker), asyncio.Event())

    def submit(self, index: int) -> asyncio.Future:
        """Start chunk `index` (chunks are submitted in order); its future gives the chunk's
        output and denoising seconds once the last worker finished it."""
        if self.base is None:
            self.base = index
        self.results[index] = asyncio.get_running_loop().create_future()
        if self.recovering is None:  # a recovery starts it with the others
            self._launch(index)
        return self.results[index]

    async def admitted(self, index: int) -> None:
        """Until the first worker has finished chunk `index` (the next may enter), or the chunk
        is finished or failed."""
        entered = asyncio.ensure_future(self._event(index, 0).wait())
        try:
            await asyncio.wait({entered, self.results[index]}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            entered.cancel()

    async def drain(self) -> None:
        """Until every submitted chunk is finished (or failed)."""
        await asyncio.gather(*self.results.values(), return_exceptions=True)

    def cancel(self) -> None:
        for task in [*self.tasks.values(), self.recovering]:
            if task is not None:
                task.cancel()

    def _launch(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._chunk(index))
        self.tasks[index] = task
        task.add_done_callback(lambda t, i=index: self._done(i, t))

    async def _chunk(self, index: int) -> Result:
        started = time.perf_counter()
        writes: dict[int, stages_pb2.Tensor] = {}
        latents: stages_pb2.Tensor | None = None
        out = None
        for w, group in enumerate(self.groups):
            if index > (self.base or 0):
                await self._event(index - 1, w).wait()
            for k in group:
                out = await self.stages.run_phase(index, k, latents)
                latents = out.latents if out.HasField("latents") else None
                if out.HasField("write_input"):  # what a restore replays this write from
                    writes[k] = out.write_input
            self._event(index, w).set()
        assert out is not None
        self.record.denoised_chunk(index, out.latents, writes)
        return out, time.perf_counter() - started

    def _done(self, index: int, task: asyncio.Task) -> None:
        result = self.results[index]
        if task.cancelled() or result.done():
            return
        err = task.exception()
        if err is None:
            self.first_failure = None
            result.set_result(task.result())
        elif isinstance(err, SessionNotHeld):
            if self.recovering is None:
                self.recovering = asyncio.get_running_loop().create_task(self._recover(err))
        else:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        for future in self.results.values():
            if not future.done():
                future.set_exception(err)
        self.cancel()

    async def _recover(self, err: SessionNotHeld) -> None:
        """Rebuild every worker at the first chunk not finished and start again from it."""
        try:
            now = time.monotonic()
            self.first_failure = self.first_failure or now
            pending = sorted(i for i, f in self.results.items() if not f.done())
            for i in pending:
                task = self.tasks.get(i)
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(
                *(self.tasks[i] for i in pending if i in self.tasks), return_exceptions=True
            )
            restart = pending[0]
            log.warning(
                "session %s: %s; rebuilding the step workers at chunk %d",
                self.stages.session_id, err.message, restart, extra=self.stages.plan.log_ids(),
            )  # fmt: skip
            if time.monotonic() - self.first_failure > self.restorer.deadline_s:
                raise err
            await self.restorer.rebuild(
                lambda: self.restorer.denoisers(restart), self.first_failure
            )
            for (chunk, _), event in self.events.items():
                if chunk >= restart:
                    event.clear()
            self.base = restart
            self.recovering = None
            for i in sorted(i for i, f in self.results.items() if not f.done()):
                self._launch(i)  # those submitted meanwhile too
        except asyncio.CancelledError:
            raise
        except BaseException as failure:
            self.recovering = None
            self._fail(failure)
