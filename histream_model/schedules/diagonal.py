"""Diagonal Distillation's schedule (arXiv 2603.09488): more steps early, fewer later, and
later chunks' context written by their own last denoising pass instead of a t = 0 commit.

- `diagonal` (one resolution, AGSW): chunk i takes `options.diagonal_steps[i]` steps (the last
  entry for every later chunk; the paper's description gives 5, 4, 3, then 2). Chunk 1 is
  committed clean at t = 0; every later chunk's keys/values are those of its last denoising pass
  (on its input at the last timestep: "partially denoised chunks as conditional inputs"), so it
  runs no commit pass at all.
- `histream-diagonal` (DRC + AGSW): HiStream+'s steps (2 + 2 on chunk 1, 1 + 1 after), chunk 1 as
  in Algorithm 1, later chunks' KV_high from their high-res denoising pass. KV_low then comes
  from a t = 0 pass on Down(x0) (`diagonal_low_context="commit"`, the default) or from the
  low-res denoising pass (`"last-pass"`). With one low step that pass reads pure noise at
  t = 1000, so its keys say nothing about the chunk: the commit of Down(x0), a quarter of the
  tokens of a high-res pass, is what keeps the structure stage's context meaningful. The FLOP
  model prices both (BENCHMARKS.md).

The published code's `use_diagonal_denoising` lists differ from the paper's description (block 0:
4 steps [1000, 933, 833, t_last], block 1: 3 steps, later blocks the configured list); they belong
to its own distilled checkpoint. The step lists here follow the paper's counts and the preset's
step-list rule (`HiStreamOptions.step_list`), and are configurable.
"""

from __future__ import annotations

from dataclasses import replace

from histream_model.config import Resolution
from histream_model.schedules.histream import (
    Planner,
    first_chunk_scale,
    histream_phases,
    warped_steps,
)
from histream_model.schedules.plan import Entry, Phase, Write
from histream_model.shape import VideoShape


class DiagonalSchedule(Planner):
    def phases(self, shape: VideoShape, index: int) -> tuple[Phase, ...]:
        if self.mode.dual_resolution:
            return self._dual(shape, index)
        options = shape.preset.options
        counts = options.diagonal_steps
        steps = counts[min(index, len(counts) - 1)]
        write = Write.CLEAN if index == 0 else Write.LAST_PASS
        warped = warped_steps(options, steps)
        scale = first_chunk_scale(shape, index)
        return (Phase(Resolution.HIGH, Entry.NOISE, warped, 0, write, scale=scale),)

    def _dual(self, shape: VideoShape, index: int) -> tuple[Phase, ...]:
        low, high = self.mode.steps(index)
        if index == 0:
            return histream_phases(shape, index, low, high)
        phases = histream_phases(shape, index, low, high, write=Write.LAST_PASS)
        if shape.preset.options.diagonal_low_context == "commit":
            return phases
        structure, refine, _ = phases  # KV_low from the low-res pass itself, no commit
        return (replace(structure, write=Write.LAST_PASS), refine)
