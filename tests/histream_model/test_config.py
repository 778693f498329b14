"""config.py: the paper's defaults, the step-list rule, and errors that name the value and what
is allowed."""

from __future__ import annotations

import pytest

from histream_model.config import (
    MODES,
    PRESETS,
    HiStreamOptions,
    Resolution,
    get_mode,
    get_preset,
    with_options,
)


def test_defaults_are_the_papers():
    options = HiStreamOptions()
    assert (options.chunk_frames, options.anchor_frames, options.window_frames) == (3, 1, 2)
    assert options.timesteps == (1000, 750, 500, 250) and options.fast_timesteps == (1000, 500)
    assert options.diagonal_steps == (5, 4, 3, 2)  # Diagonal's description: 5, 4, 3, then 2
    assert options.at(Resolution.LOW) is options.low and options.at(Resolution.HIGH) is options.high


def test_step_lists_are_the_configured_ones_or_evenly_spaced():
    options = HiStreamOptions()
    assert options.step_list(4) == (1000, 750, 500, 250)
    assert options.step_list(2) == (1000, 500)
    assert options.step_list(5) == (1000, 800, 600, 400, 200)
    assert options.step_list(3) == (1000, 667, 333)
    assert options.step_list(1) == (1000,)
    with pytest.raises(ValueError, match=r"num_steps=0 must be in \[1, 1000\]"):
        options.step_list(0)


def test_every_mode_steps_as_its_summary_says():
    steps = {name: (m.first_chunk_steps, m.later_chunk_steps) for name, m in MODES.items()}
    assert steps["histream"] == ((2, 2), (2, 2)) and steps["histream+"] == ((2, 2), (1, 1))
    assert steps["self-forcing"] == ((0, 4), (0, 4)) and steps["no-drc"] == ((0, 4), (0, 4))
    assert get_mode("histream+").steps(0) == (2, 2) and get_mode("histream+").steps(5) == (1, 1)
    assert get_mode("self-forcing").resolutions == (Resolution.HIGH,)
    assert get_mode("histream").resolutions == (Resolution.LOW, Resolution.HIGH)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_frames": 0}, "chunk_frames=0 must be >= 1"),
        ({"window_frames": -1}, "window_frames=-1 must be >= 0"),
        ({"low_res_factor": 0}, "low_res_factor=0 must be >= 1"),
        ({"first_chunk_attn_scale": 0.0}, "first_chunk_attn_scale=0.0 must be > 0"),
        ({"diagonal_steps": ()}, "diagonal_steps is empty"),
        ({"diagonal_steps": (3, 0)}, r"diagonal_steps\[1\]=0 must be an integer >= 1"),
        ({"diagonal_steps": (3, 3)}, r"must decrease strictly: entry 1 \(3\) is not below"),
        ({"diagonal_low_context": "x"}, "diagonal_low_context='x' must be 'commit' or 'last-pass'"),
        ({"warp": 2}, r"unknown sampling options \['warp'\]"),
    ],
)
def test_bad_options_are_refused_naming_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        with_options(PRESETS["tiny"], **changes)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown mode 'fast'; choose one of \['histream'"):
        get_mode("fast")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of \[.*'tiny'"):
        get_preset("huge")


def test_the_hd_knobs_of_the_1080p_preset_are_the_papers():
    """README, *Presets*: timestep shift 7 for wan2.1-1.3b, NTK RoPE factors 2 at the low
    (tuned) resolution and 5 at 1080p (spatial axes only), CineScale factor 2 on chunk 1."""
    options = get_preset("wan2.1-1.3b").options
    assert options.shift == 7.0
    assert options.low.ntk_factors == (1.0, 2.0, 2.0)
    assert options.high.ntk_factors == (1.0, 5.0, 5.0)
    assert options.first_chunk_attn_scale == 2.0
