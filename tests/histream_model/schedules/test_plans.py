"""Chunk plans as data: HiStream's phases per mode, their timesteps and noise draws, and the
rules a plan must keep."""

from __future__ import annotations

from dataclasses import replace

import pytest

from histream_model import MODES, PRESETS
from histream_model.config import Resolution, VideoShape, get_mode
from histream_model.schedules import (
    ChunkPlan,
    Entry,
    PassKind,
    Phase,
    plan_chunk,
    schedule_for,
)

TINY = PRESETS["tiny"]
LOW, HIGH = Resolution.LOW, Resolution.HIGH


def shape(mode: str, frames: int = 33) -> VideoShape:
    return VideoShape(TINY, get_mode(mode), 64, 96, frames)


def outline(plan: ChunkPlan) -> list[tuple[str, str, int, bool]]:
    return [(p.resolution, p.entry, len(p.timesteps), p.commit) for p in plan.phases]


# Algorithm 1 per mode, written out: (resolution, entry, denoising steps, commit) per phase.
DRC = [
    (LOW, Entry.NOISE, 2, False),
    (HIGH, Entry.UPSAMPLE, 2, True),
    (LOW, Entry.DOWNSAMPLE, 0, True),
]
DRC_1 = [
    (LOW, Entry.NOISE, 1, False),
    (HIGH, Entry.UPSAMPLE, 1, True),
    (LOW, Entry.DOWNSAMPLE, 0, True),
]
HIGH_ONLY = [(HIGH, Entry.NOISE, 4, True)]
EXPECTED = {
    "histream": (DRC, DRC),
    "histream+": (DRC, DRC_1),
    "no-drc": (HIGH_ONLY, HIGH_ONLY),
    "no-agsw": (DRC, DRC),
    "naive-2step": (DRC_1, DRC_1),
    "self-forcing": (HIGH_ONLY, HIGH_ONLY),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_plans_algorithm_1(mode):
    first, later = EXPECTED[mode]
    s = shape(mode)
    assert outline(plan_chunk(s, 0)) == first
    for i in range(1, s.num_chunks):
        assert outline(plan_chunk(s, i)) == later


def test_every_mode_has_a_schedule():
    assert set(EXPECTED) == set(MODES)


def test_dual_resolution_plan_shares_one_warped_step_list_and_never_reuses_a_draw():
    s = shape("histream")
    plan = plan_chunk(s, 0)
    # [1000, 750, 500, 250] warped with shift 5: s*sigma / (1 + (s - 1) sigma)
    warped = [1000 * 5 * x / (1 + 4 * x) for x in (1.0, 0.75, 0.5, 0.25)]
    assert plan.timesteps(LOW) + plan.timesteps(HIGH) == pytest.approx(warped)
    low, high, _ = plan.phases
    # noise draws within the chunk: low noise 0, low re-noise 1, upsample re-noise 2, high 3
    low_draws = [low.first_draw + j for j in range(len(low.timesteps))]
    high_draws = [high.first_draw + j for j in range(len(high.timesteps))]
    assert low_draws + high_draws == [0, 1, 2, 3]
    assert plan.output == 1 and plan.follow_ups == (2,)
    assert (plan.frame_start, plan.num_frames) == (0, 3)
    assert plan_chunk(s, 2).frame_start == 6


def test_passes_in_order():
    plan = plan_chunk(shape("histream+"), 1)
    assert plan.passes() == (
        (LOW, PassKind.DENOISE),
        (HIGH, PassKind.DENOISE),
        (HIGH, PassKind.COMMIT),
        (LOW, PassKind.COMMIT),
    )


def test_first_chunk_scale_off_when_the_factor_is_one():
    preset = replace(TINY, options=replace(TINY.options, first_chunk_attn_scale=1.0))
    plan = plan_chunk(VideoShape(preset, get_mode("histream"), 64, 96, 33), 0)
    assert all(p.scale is None for p in plan.phases)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timesteps": (), "commit": False}, "must denoise or commit"),
        ({"entry": Entry.DOWNSAMPLE}, "cannot be denoised"),
        ({"entry": Entry.UPSAMPLE, "timesteps": ()}, "must have denoising timesteps"),
    ],
)
def test_a_phase_that_cannot_run_is_refused(kwargs, message):
    fields = {"resolution": HIGH, "entry": Entry.NOISE, "timesteps": (1000.0,),
              "first_draw": 0, "commit": True} | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Phase(**fields)


def test_a_plan_must_start_from_noise_and_denoise():
    commit = Phase(LOW, Entry.DOWNSAMPLE, (), 0, commit=True)
    with pytest.raises(ValueError, match="starts with a phase from noise"):
        ChunkPlan(0, 0, 3, (commit,))
    with pytest.raises(ValueError, match="starts with a phase from noise"):
        ChunkPlan(0, 0, 3, ())


def test_unknown_schedule_is_named():
    mode = replace(get_mode("histream"), schedule="hiar")
    with pytest.raises(ValueError, match="mode 'histream' names schedule 'hiar'; known"):
        schedule_for(mode)
