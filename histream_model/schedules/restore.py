"""Rebuilding a session's caches from latents (re-prefill), for a session resumed elsewhere.

The caches are not stored: they are large (KV_high alone is ~9 GB at 1080p) and every one of
their entries was written by a chunk's cache write, a function of the latent the write read
(the chunk's clean latents for a commit; for HiAR's re-noised writes and Diagonal's kept last
pass, a latent the executor reports as the phase's `write_input`), its prompt and the cache
before it. Replaying the writes of every chunk so far, in order, therefore rebuilds the caches
bit for bit (a kept last pass is replayed as a kv-only pass on the same input: the same keys).
Under AGSW only the anchor and the latest window are ever read again, so a snapshot keeps the
anchor chunk and the last few chunks, and replays just those: the anchor is exact (its commit
saw no earlier context), the window close (its keys were first computed against older
windows). `tests/histream_model/schedules` and BENCHMARKS.md measure how close.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from histream_model.config import Resolution
from histream_model.dit import WanDiT
from histream_model.schedules.execute import ResolutionState, _commit, _Pass, handoff
from histream_model.schedules.plan import ChunkPlan, Phase, Write
from histream_model.shape import VideoShape


def snapshot_chunks(num_chunks_done: int, anchor_chunks: int, window_chunks: int) -> list[int]:
    """Which chunks' latents a snapshot keeps once `num_chunks_done` chunks are generated: the
    first `anchor_chunks` and the last `window_chunks` (all of them while that is fewer)."""
    done = range(num_chunks_done)
    keep = set(done[:anchor_chunks]) | set(done[max(0, num_chunks_done - window_chunks) :])
    return sorted(keep)


Holder = Resolution | Collection[str]  # a stage's share: a resolution, or cache names


def _holds(holder: Holder) -> Callable[[Phase], bool]:
    if isinstance(holder, Resolution):
        return lambda phase: phase.resolution == holder
    names = frozenset(holder)
    return lambda phase: phase.cache in names


def position_after(
    plans: Callable[[int], ChunkPlan], holder: Holder, num_chunks_done: int
) -> tuple[int, int] | None:
    """Where a stage's state (the caches of one resolution, or the named caches) stands once
    chunks 0 .. num_chunks_done - 1 are complete: the last phase (chunk, phase index) they ran
    on those caches; None before any. A state whose last phase run is this one holds exactly
    those chunks, so it can go on as it is."""
    holds = _holds(holder)
    for chunk in reversed(range(num_chunks_done)):
        phases = plans(chunk).phases
        here = [i for i, phase in enumerate(phases) if holds(phase)]
        if here:
            return chunk, max(here)
    return None


def phase_after(
    plans: Callable[[int], ChunkPlan],
    holder: Holder,
    position: tuple[int, int] | None,
    num_chunks: int,
) -> tuple[int, int] | None:
    """The phase (chunk, phase index) a stage's state runs next when the last one it ran is
    `position` (None: none yet); None past the last chunk. A stage's phases run in this order
    only, so a request for any other finds a state that is not the session's."""
    holds = _holds(holder)
    chunk, after = (0, -1) if position is None else position
    while chunk < num_chunks:
        phases = plans(chunk).phases
        later = [i for i, ph in enumerate(phases) if holds(ph) and i > after]
        if later:
            return chunk, later[0]
        chunk, after = chunk + 1, -1
    return None


@torch.no_grad()
def reprefill(
    model: WanDiT,
    state: ResolutionState,
    shape: VideoShape,
    plans: Callable[[int], ChunkPlan],
    latents: Mapping[int, torch.Tensor],
    contexts: Callable[[int], torch.Tensor],
    next_chunk: int,
    writes: Mapping[tuple[int, int], torch.Tensor] | None = None,
) -> int:
    """Replay, in chunk order, the writes into `state`'s cache of the chunks whose clean
    high-res latents are given; `contexts(k)` is the text context chunk k was generated under,
    `writes[(k, phase)]` the write input of a phase that reported one. The cache is then ready
    for chunk `next_chunk`. Returns the passes run. `state` should be fresh (an empty cache)."""
    writes = writes or {}
    passes, text_of = 0, None
    for index in sorted(latents):
        plan = plans(index)
        context = contexts(index)
        if text_of is not context:
            state.text = model.text_kv(context.to(state.cache.k.device))
            text_of = context
        x0 = latents[index].to(device=state.cache.k.device, dtype=torch.float32)
        state.cache.skip_to(plan.frame_start)  # chunks not kept are not replayed
        for i, phase in enumerate(plan.phases):
            if not phase.commit or phase.cache != state.name:
                continue
            if phase.write != Write.CLEAN or i < plan.output:
                if (index, i) not in writes:
                    raise ValueError(
                        f"phase {i} of chunk {index} writes its cache from a latent other than "
                        "the chunk's output; a restore needs that write input"
                    )
                x = writes[index, i].to(device=state.cache.k.device, dtype=torch.float32)
            else:
                x = x0 if i == plan.output else handoff(shape, phase, x0)
            _commit(_Pass.of(model, state, plan, phase), x, phase.write_timestep)
            passes += 1
    if next_chunk < shape.num_chunks:  # else every chunk is in: the cache stays as replayed
        state.cache.skip_to(plans(next_chunk).frame_start)
    return passes
