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
from histream_model.config import Mode, Resolution, VideoShape
from histream_model.schedules.flow import FlowSchedule
from histream_model.schedules.plan import ChunkPlan, Entry, Phase


@dataclass(frozen=True)
class HiStreamSchedule:
    """Plans every HiStream mode's chunks: `histream`, `histream+`, the ablations, Self-Forcing."""

    mode: Mode

    def plan(self, shape: VideoShape, index: int) -> ChunkPlan:
        if not 0 <= index < shape.num_chunks:
            raise ValueError(f"chunk index {index} outside [0, {shape.num_chunks})")
        options = shape.preset.options
        low, high = self.mode.steps(index)
        warped = FlowSchedule(options.shift, options.num_train_timesteps).warp(
            options.step_list(low + high)
        )
        scale = None
        if index == 0 and options.first_chunk_attn_scale != 1.0:
            reference = options.attn_reference_tokens or shape.tokens_per_frame(shape.low_latent_hw)
            scale = scaled_softmax_scale(
                shape.preset.dit.head_dim, options.first_chunk_attn_scale, reference
            )
        if self.mode.dual_resolution:
            phases = (
                Phase(Resolution.LOW, Entry.NOISE, warped[:low], first_draw=0, commit=False),
                Phase(Resolution.HIGH, Entry.UPSAMPLE, warped[low:], low, commit=True, scale=scale),
                Phase(Resolution.LOW, Entry.DOWNSAMPLE, (), first_draw=0, commit=True),
            )
        else:
            phases = (Phase(Resolution.HIGH, Entry.NOISE, warped, 0, commit=True, scale=scale),)
        m = options.chunk_frames
        return ChunkPlan(index=index, frame_start=index * m, num_frames=m, phases=phases)
