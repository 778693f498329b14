"""Schedules: what each chunk runs (plans), how it runs (the executor), the noise schedule.

- `flow.py`      shifted flow matching and counter-based noise;
- `plan.py`      the vocabulary: a chunk is phases, a phase is passes at one resolution;
- `histream.py`  HiStream's Algorithm 1 for every mode (the paper's method, ablations, baseline);
- `diagonal.py`  Diagonal distillation: fewer steps later, context from the last pass;
- `hiar.py`      HiAR: one cache per denoising step, at that step's noise level;
- `execute.py`   runs a phase against one cache's state, and a whole chunk in one process;
- `restore.py`   rebuilds caches from a snapshot's latents (re-prefill).

A new schedule is a planner with a `plan(shape, index) -> ChunkPlan` method, registered in
`SCHEDULES` under the name its modes give in `Mode.schedule`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch

from histream_model.config import Mode, Resolution
from histream_model.dit import WanDiT
from histream_model.schedules.diagonal import DiagonalSchedule
from histream_model.schedules.execute import (
    PhaseResult,
    ResolutionState,
    handoff,
    new_resolution_state,
    run_chunk,
    run_phase,
    set_text,
)
from histream_model.schedules.flow import FlowSchedule, chunk_noise
from histream_model.schedules.hiar import HiARSchedule
from histream_model.schedules.histream import HiStreamSchedule
from histream_model.schedules.plan import ChunkPlan, Entry, PassKind, Phase, Write
from histream_model.shape import VideoShape


class Schedule(Protocol):
    def plan(self, shape: VideoShape, index: int) -> ChunkPlan:
        """Chunk `index` of a video of `shape`; raises ValueError outside the video."""
        ...


SCHEDULES: dict[str, type] = {
    "histream": HiStreamSchedule,
    "diagonal": DiagonalSchedule,
    "hiar": HiARSchedule,
}


def schedule_for(mode: Mode) -> Schedule:
    if mode.schedule not in SCHEDULES:
        raise ValueError(
            f"mode {mode.name!r} names schedule {mode.schedule!r}; known: {sorted(SCHEDULES)}"
        )
    return SCHEDULES[mode.schedule](mode)


def plan_chunk(shape: VideoShape, index: int) -> ChunkPlan:
    """The plan of chunk `index` under the shape's mode."""
    return schedule_for(shape.mode).plan(shape, index)


def session_caches(shape: VideoShape) -> dict[str, Resolution]:
    """Every cache a session of `shape` holds, by name, with its resolution (every schedule
    uses all of its caches from the first chunk on)."""
    return plan_chunk(shape, 0).caches()


def new_session_states(
    model: WanDiT,
    shape: VideoShape,
    context: torch.Tensor,
    batch: int = 1,
    resolution: Resolution | None = None,
    names: Collection[str] | None = None,
) -> dict[str, ResolutionState]:
    """Fresh state for each of the session's caches (only those at `resolution`, or only
    those named, if given), sharing one text K/V."""
    states: dict[str, ResolutionState] = {}
    for name, res in session_caches(shape).items():
        if (resolution is None or res == resolution) and (names is None or name in names):
            text = next(iter(states.values())).text if states else None
            states[name] = new_resolution_state(model, shape, res, context, batch, name, text)
    return states


__all__ = [
    "SCHEDULES",
    "ChunkPlan",
    "DiagonalSchedule",
    "Entry",
    "FlowSchedule",
    "HiARSchedule",
    "HiStreamSchedule",
    "PassKind",
    "Phase",
    "PhaseResult",
    "ResolutionState",
    "Schedule",
    "Write",
    "chunk_noise",
    "handoff",
    "new_resolution_state",
    "new_session_states",
    "plan_chunk",
    "run_chunk",
    "run_phase",
    "schedule_for",
    "session_caches",
    "set_text",
]
