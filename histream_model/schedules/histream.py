"""HiStream's chunk schedule (Algorithm 1), for its method, its ablations and the baseline.

With dual-resolution caching (DRC), chunk i runs three phases:

1. low:  structure steps from fresh noise against KV_low (lines 5-12);
2. high: Up(x0_low) re-noised, refinement steps against KV_high (lines 13-16, 26-29), then the
         t = 0 pass on the clean x0 writing KV_high (line 17);
3. low:  the t = 0 pass on Down(x0) writing KV_low: dual-resolution caching (line 18).

Without DRC, one high phase from noise, then its commit. The caches slide their anchor-guided
window as they commit (lines 19-25; see kv_cache.py). The mode gives the step counts per chunk
(HiStream+ takes 2 + 2 on the first chunk and 1 + 1 after); the options give the step lists, the
shift and the first chunk's CineScale attention scale at high resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

from histream_model.attention import scaled_softmax_scale
from histream_model.config import HiStreamOptions, Mode, Resolution
from histream_model.schedules.flow import FlowSchedule
from histream_model.schedules.plan import ChunkPlan, Entry, Phase, Write
from histream_model.shape import VideoShape


def warped_steps(options: HiStreamOptions, num_steps: int) -> tuple[float, ...]:
    """The timesteps a chunk denoised in `num_steps` steps is evaluated at (list, then shift)."""
    return FlowSchedule(options.shift, options.num_train_timesteps).warp(
        options.step_list(num_steps)
    )


def first_chunk_scale(shape: VideoShape, index: int) -> float | None:
    """CineScale's softmax scale of chunk `index`'s high-res passes: the first chunk only."""
    options = shape.preset.options
    if index != 0 or options.first_chunk_attn_scale == 1.0:
        return None
    reference = options.attn_reference_tokens or shape.tokens_per_frame(shape.low_latent_hw)
    return scaled_softmax_scale(
        shape.preset.dit.head_dim, options.first_chunk_attn_scale, reference
    )


@dataclass(frozen=True)
class Planner:
    """What every schedule shares: a mode, chunk `index`'s frames; subclasses give the phases."""

    mode: Mode

    def plan(self, shape: VideoShape, index: int) -> ChunkPlan:
        if not 0 <= index < shape.num_chunks:
            raise ValueError(f"chunk index {index} outside [0, {shape.num_chunks})")
        m = shape.preset.options.chunk_frames
        phases = self.phases(shape, index)
        return ChunkPlan(index=index, frame_start=index * m, num_frames=m, phases=phases)

    def phases(self, shape: VideoShape, index: int) -> tuple[Phase, ...]:
        raise NotImplementedError


def histream_phases(
    shape: VideoShape, index: int, low: int, high: int, write: Write = Write.CLEAN
) -> tuple[Phase, ...]:
    """One chunk of Algorithm 1 with `low` + `high` steps; `write` is how the high-res phase
    leaves it in KV_high (Algorithm 1: a clean commit). Without low steps, one high phase."""
    warped = warped_steps(shape.preset.options, low + high)
    scale = first_chunk_scale(shape, index)
    if not low:
        return (Phase(Resolution.HIGH, Entry.NOISE, warped, 0, write, scale=scale),)
    return (
        Phase(Resolution.LOW, Entry.NOISE, warped[:low], first_draw=0),
        Phase(Resolution.HIGH, Entry.UPSAMPLE, warped[low:], low, write, scale=scale),
        Phase(Resolution.LOW, Entry.DOWNSAMPLE, (), first_draw=0, write=Write.CLEAN),
    )


class HiStreamSchedule(Planner):
    """Plans every HiStream mode's chunks: `histream`, `histream+`, the ablations, Self-Forcing."""

    def phases(self, shape: VideoShape, index: int) -> tuple[Phase, ...]:
        low, high = self.mode.steps(index)
        if not self.mode.dual_resolution and low:
            raise ValueError(f"mode {self.mode.name!r} has no low resolution for {low} steps")
        return histream_phases(shape, index, low, high)
