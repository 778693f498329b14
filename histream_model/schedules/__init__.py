"""Schedules: what each chunk runs (plans), how it runs (the executor), the noise schedule.

- `flow.py`      shifted flow matching and counter-based noise;
- `plan.py`      the vocabulary: a chunk is phases, a phase is passes at one resolution;
- `histream.py`  HiStream's Algorithm 1 for every mode (the paper's method, ablations, baseline);
- `execute.py`   runs a phase against one resolution's state, and a whole chunk in one process.

A new schedule is a planner with a `plan(shape, index) -> ChunkPlan` method, registered in
`SCHEDULES` under the name its modes give in `Mode.schedule`.
"""

from __future__ import annotations

from typing import Protocol

from histream_model.config import Mode, VideoShape
from histream_model.schedules.execute import (
    ResolutionState,
    handoff,
    new_resolution_state,
    run_chunk,
    run_phase,
)
from histream_model.schedules.flow import FlowSchedule, chunk_noise
from histream_model.schedules.histream import HiStreamSchedule
from histream_model.schedules.plan import ChunkPlan, Entry, PassKind, Phase


class Schedule(Protocol):
    def plan(self, shape: VideoShape, index: int) -> ChunkPlan:
        """Chunk `index` of a video of `shape`; raises ValueError outside the video."""
        ...


SCHEDULES: dict[str, type] = {"histream": HiStreamSchedule}


def schedule_for(mode: Mode) -> Schedule:
    if mode.schedule not in SCHEDULES:
        raise ValueError(
            f"mode {mode.name!r} names schedule {mode.schedule!r}; known: {sorted(SCHEDULES)}"
        )
    return SCHEDULES[mode.schedule](mode)


def plan_chunk(shape: VideoShape, index: int) -> ChunkPlan:
    """The plan of chunk `index` under the shape's mode."""
    return schedule_for(shape.mode).plan(shape, index)


__all__ = [
    "SCHEDULES",
    "ChunkPlan",
    "Entry",
    "FlowSchedule",
    "HiStreamSchedule",
    "PassKind",
    "Phase",
    "ResolutionState",
    "Schedule",
    "chunk_noise",
    "handoff",
    "new_resolution_state",
    "plan_chunk",
    "run_chunk",
    "run_phase",
    "schedule_for",
]
