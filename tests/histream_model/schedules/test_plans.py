"""Chunk plans as data: HiStream's phases per mode, their timesteps and noise draws, and the
rules a plan must keep."""

from __future__ import annotations

from dataclasses import replace

import pytest

from histream_model import MODES, PRESETS
from histream_model.config import Resolution, get_mode
from histream_model.schedules import (
    ChunkPlan,
    Entry,
    PassKind,
    Phase,
    Write,
    plan_chunk,
    schedule_for,
)
from histream_model.shape import VideoShape

TINY = PRESETS["tiny"]
LOW, HIGH = Resolution.LOW, Resolution.HIGH


def shape(mode: str, frames: int = 33) -> VideoShape:
    return VideoShape(TINY, get_mode(mode), 64, 96, frames)


def outline(plan: ChunkPlan) -> list[tuple[str, str, int, str]]:
    return [(p.cache, p.entry, len(p.timesteps), p.write) for p in plan.phases]


CLEAN, NONE, RENOISED, LAST = Write.CLEAN, Write.NONE, Write.RENOISED, Write.LAST_PASS
# Every mode's chunks, written out: (cache, entry, denoising steps, cache write) per phase.
DRC = [
    ("low", Entry.NOISE, 2, NONE),
    ("high", Entry.UPSAMPLE, 2, CLEAN),
    ("low", Entry.DOWNSAMPLE, 0, CLEAN),
]
DRC_1 = [
    ("low", Entry.NOISE, 1, NONE),
    ("high", Entry.UPSAMPLE, 1, CLEAN),
    ("low", Entry.DOWNSAMPLE, 0, CLEAN),
]
HIGH_ONLY = [("high", Entry.NOISE, 4, CLEAN)]
# Diagonal: 5, 4, 3, then 2 steps; chunk 1 committed clean, later chunks keep their last pass
DIAGONAL = [[("high", Entry.NOISE, n, CLEAN if n == 5 else LAST)] for n in (5, 4, 3, 2, 2)]
# HiStream+ steps; later chunks' KV_high from the high-res pass, KV_low from Down(x0)
DRC_DIAGONAL = [
    ("low", Entry.NOISE, 1, NONE),
    ("high", Entry.UPSAMPLE, 1, LAST),
    ("low", Entry.DOWNSAMPLE, 0, CLEAN),
]
# HiAR: a cache per step, each written with the chunk re-noised to the next step (clean last)
HIAR = [
    ("high.1", Entry.NOISE, 1, RENOISED),
    ("high.2", Entry.RENOISE, 1, RENOISED),
    ("high.3", Entry.RENOISE, 1, RENOISED),
    ("high.4", Entry.RENOISE, 1, CLEAN),
]
DRC_HIAR = [
    ("low.1", Entry.NOISE, 1, RENOISED),
    ("low.2", Entry.RENOISE, 1, RENOISED),
    ("high.3", Entry.UPSAMPLE, 1, RENOISED),
    ("high.4", Entry.RENOISE, 1, CLEAN),
]
EXPECTED = {
    "histream": (DRC, DRC),
    "histream+": (DRC, DRC_1),
    "no-drc": (HIGH_ONLY, HIGH_ONLY),
    "no-agsw": (DRC, DRC),
    "naive-2step": (DRC_1, DRC_1),
    "self-forcing": (HIGH_ONLY, HIGH_ONLY),
    "histream-diagonal": (DRC, DRC_DIAGONAL),
    "hiar": (HIAR, HIAR),
    "histream-hiar": (DRC_HIAR, DRC_HIAR),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_plans_algorithm_1(mode):
    first, later = EXPECTED[mode]
    s = shape(mode)
    assert outline(plan_chunk(s, 0)) == first
    for i in range(1, s.num_chunks):
        assert outline(plan_chunk(s, i)) == later


def test_every_mode_has_a_schedule():
    assert set(EXPECTED) | {"diagonal"} == set(MODES)


def test_diagonal_steps_decrease_to_the_floor():
    s = shape("diagonal", 45)  # 12 latent frames: 4 chunks
    assert [outline(plan_chunk(s, i)) for i in range(4)] == DIAGONAL[:4]
    s = shape("diagonal", 57)  # 5 chunks: the floor repeats
    assert outline(plan_chunk(s, 4)) == DIAGONAL[4]
    # step lists: 5 -> 1000, 800, 600, 400, 200 and 3 -> 1000, 667, 333, warped with shift 5
    warp = [1000 * 5 * x / (1 + 4 * x) for x in (1.0, 0.8, 0.6, 0.4, 0.2)]
    assert plan_chunk(s, 0).timesteps(HIGH) == pytest.approx(warp)
    warp = [1000 * 5 * x / (1 + 4 * x) for x in (1.0, 0.667, 0.333)]
    assert plan_chunk(s, 2).timesteps(HIGH) == pytest.approx(warp)


def test_diagonal_steps_are_configurable():
    preset = replace(TINY, options=replace(TINY.options, diagonal_steps=(3, 1)))
    s = VideoShape(preset, get_mode("diagonal"), 64, 96, 33)
    assert [len(plan_chunk(s, i).timesteps(HIGH)) for i in range(3)] == [3, 1, 1]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((5, 4, 4, 2), r"must decrease strictly: entry 2 \(4\) is not below entry 1 \(4\)"),
        ((2, 3), r"entry 1 \(3\) is not below entry 0 \(2\)"),
        ((3, 0), r"diagonal_steps\[1\]=0 must be an integer >= 1"),
        ((), "diagonal_steps is empty"),
    ],
)
def test_bad_diagonal_steps_are_refused(steps, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY.options, diagonal_steps=steps)


def test_histream_diagonal_low_context_from_the_last_pass():
    options = replace(TINY.options, diagonal_low_context="last-pass")
    s = VideoShape(replace(TINY, options=options), get_mode("histream-diagonal"), 64, 96, 33)
    assert outline(plan_chunk(s, 0)) == DRC
    assert outline(plan_chunk(s, 1)) == [("low", Entry.NOISE, 1, LAST), DRC_DIAGONAL[1]]
    with pytest.raises(ValueError, match="diagonal_low_context='both' must be"):
        replace(TINY.options, diagonal_low_context="both")


def test_hiar_writes_each_step_cache_at_the_next_steps_level():
    plan = plan_chunk(shape("histream-hiar"), 1)
    t = plan.timesteps(LOW) + plan.timesteps(HIGH)
    assert [p.write_t for p in plan.phases[:3]] == list(t[1:])
    assert plan.phases[3].write_timestep == 0.0
    # a same-resolution write re-noises with the draw the next step enters from (one latent);
    # the low -> high step gets its own low-res draw
    assert [p.first_draw for p in plan.phases] == [0, 1, 2, 3]
    assert [p.write_draw for p in plan.phases[:3]] == [1, 102, 3]
    assert plan.caches() == {"low.1": LOW, "low.2": LOW, "high.3": HIGH, "high.4": HIGH}
    assert plan.passes() == ((LOW, PassKind.DENOISE), (LOW, PassKind.COMMIT)) * 2 + (
        (HIGH, PassKind.DENOISE), (HIGH, PassKind.COMMIT)) * 2  # fmt: skip


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
        ({"timesteps": (), "write": Write.NONE}, "must denoise or commit"),
        ({"timesteps": (), "entry": Entry.DOWNSAMPLE, "write": LAST}, "no last pass to keep"),
        ({"write": RENOISED}, "re-noised write needs a timestep > 0"),
        ({"entry": Entry.DOWNSAMPLE}, "cannot be denoised"),
        ({"entry": Entry.UPSAMPLE, "timesteps": ()}, "must have denoising timesteps"),
    ],
)
def test_a_phase_that_cannot_run_is_refused(kwargs, message):
    fields = {"resolution": HIGH, "entry": Entry.NOISE, "timesteps": (1000.0,),
              "first_draw": 0, "write": CLEAN} | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message):
        Phase(**fields)


def test_a_plan_must_start_from_noise_and_denoise():
    commit = Phase(LOW, Entry.DOWNSAMPLE, (), 0, Write.CLEAN)
    with pytest.raises(ValueError, match="starts with a phase from noise"):
        ChunkPlan(0, 0, 3, (commit,))
    with pytest.raises(ValueError, match="starts with a phase from noise"):
        ChunkPlan(0, 0, 3, ())


def test_unknown_schedule_is_named():
    mode = replace(get_mode("histream"), schedule="zigzag")
    with pytest.raises(ValueError, match="mode 'histream' names schedule 'zigzag'; known"):
        schedule_for(mode)
