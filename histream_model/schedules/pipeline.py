"""Pipelined execution of a schedule: the chunk's phases split among workers, each holding only
its own phases' caches, chunks flowing through them as a wavefront (HiAR's pipeline-parallel
inference: worker s runs chunk b at micro-step s + b).

A worker runs its phases of chunk i once it has the latents of the worker before it for chunk i
and has finished its own phases of chunk i - 1; so chunk i at step k runs while chunk i + 1 runs
step k - 1. Every phase reads only its own cache and its input latents, and noise is a function
of (seed, chunk, draw), so the latents are those of `run_chunk`, bit for bit, whatever the
number of workers.

`split_phases` builds the topology from the schedule: contiguous groups of the chunk's phases,
one per worker, never splitting a cache between two workers, balanced by their work. Workers
here are threads of one process (torch releases the GIL in its kernels); the distributed stages
run the same plan with a worker per process.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence

import torch

from histream_model.dit import WanDiT
from histream_model.schedules.execute import ResolutionState, handoff, run_phase
from histream_model.schedules.plan import ChunkPlan
from histream_model.shape import VideoShape


def pipelined(shape: VideoShape) -> bool:
    """Whether a session of `shape` runs on step workers when a service has them: the
    schedules whose phases each hold a cache of their own (HiAR's)."""
    return shape.mode.schedule == "hiar"


def split_phases(
    plan: ChunkPlan, workers: int, shape: VideoShape | None = None
) -> list[tuple[int, ...]]:
    """The chunk's phases in `workers` contiguous groups; a cache (and so every phase using it)
    belongs to one worker. The groups balance the work: each cache weighs its phases' forward
    passes times the tokens of a frame at its resolution (with `shape`; else 1 per cache), and
    the split with the lightest heaviest group wins (the first such, in order). Raises if there
    are fewer caches than workers, or if a worker's phases would not all follow the last
    worker's (the plan is no pipeline)."""
    caches = list(plan.caches())
    if not 1 <= workers <= len(caches):
        raise ValueError(
            f"workers={workers} must be in [1, {len(caches)}]: the schedule has "
            f"{len(caches)} caches ({', '.join(caches)}) and a cache cannot be split"
        )
    weight = dict.fromkeys(caches, 0)
    for phase in plan.phases:
        tokens = shape.tokens_per_frame(shape.latent_hw(phase.resolution)) if shape else 0
        weight[phase.cache] += len(phase.passes) * tokens if shape else 0
    if not shape:
        weight = dict.fromkeys(caches, 1)
    best: tuple[int, ...] = ()
    best_load = None
    for cuts in itertools.combinations(range(1, len(caches)), workers - 1):
        bounds = (0, *cuts, len(caches))
        load = max(sum(weight[c] for c in caches[a:b]) for a, b in itertools.pairwise(bounds))
        if best_load is None or load < best_load:
            best, best_load = bounds, load
    owner = {name: w for w, (a, b) in enumerate(itertools.pairwise(best)) for name in caches[a:b]}
    groups: list[list[int]] = [[] for _ in range(workers)]
    for i, phase in enumerate(plan.phases):
        groups[owner[phase.cache]].append(i)
    for w in range(1, workers):
        if groups[w] and groups[w - 1] and groups[w][0] < groups[w - 1][-1]:
            raise ValueError(
                f"the phases of worker {w} do not all follow those of worker {w - 1}; "
                "this schedule cannot be pipelined over these caches"
            )
    return [tuple(g) for g in groups]


class _Stop:
    pass


class PipelinedRun:
    """One session's chunks through `workers` threads, each with only its phases' states."""

    def __init__(
        self,
        model: WanDiT,
        states: dict[str, ResolutionState],
        shape: VideoShape,
        seed: int,
        workers: int,
        plans: Sequence[ChunkPlan],
        threads_per_worker: int | None = None,
    ) -> None:
        self.model, self.states, self.shape, self.seed = model, states, shape, seed
        self.plans = list(plans)
        self.groups = split_phases(self.plans[0], workers, shape)
        for plan in self.plans[1:]:
            if split_phases(plan, workers, shape) != self.groups:
                raise ValueError("every chunk's phases must split alike to be pipelined")
        self.threads = threads_per_worker
        self.inboxes: list[queue.Queue] = [queue.Queue() for _ in self.groups]
        self.outbox: queue.Queue = queue.Queue()

    def _worker(self, w: int) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread: the pool of this worker
        options = self.shape.preset.options
        try:
            while True:
                item = self.inboxes[w].get()
                if isinstance(item, _Stop):
                    if w + 1 < len(self.groups):
                        self.inboxes[w + 1].put(item)
                    return
                index, received, latents = item
                plan = self.plans[index]
                for k in self.groups[w]:
                    phase = plan.phases[k]
                    state = self.states[phase.cache]
                    result = run_phase(
                        self.model, state, plan, phase, options, self.seed, received
                    ).latents
                    if k == plan.output:
                        latents = result
                    if k + 1 < len(plan.phases):
                        received = handoff(self.shape, plan.phases[k + 1], result)
                if w + 1 < len(self.groups):
                    self.inboxes[w + 1].put((index, received, latents))
                else:
                    self.outbox.put((index, latents))
        except BaseException as err:  # surfaces in the caller's iteration
            self.outbox.put(err)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(chunk index, clean latents) in chunk order, as the last worker finishes them."""
        threads = [
            threading.Thread(target=self._worker, args=(w,), daemon=True)
            for w in range(len(self.groups))
        ]
        for t in threads:
            t.start()
        for plan in self.plans:
            self.inboxes[0].put((plan.index, None, None))
        self.inboxes[0].put(_Stop())
        try:
            for _ in self.plans:
                item = self.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for t in threads:
                t.join()
