"""Request validation at the gateway: which `model` ids a request may name and what they mean."""

from __future__ import annotations

import pytest

from histream_model import MODES, get_preset
from services.errors import InvalidArgument
from services.gateway.requests import (
    SessionStart,
    VideoCreate,
    model_ids,
    resolve_session,
    resolve_video,
)

TINY = get_preset("tiny")


def test_model_ids_are_the_served_model_then_its_modes():
    assert model_ids("tiny") == ["tiny", *MODES]
    assert model_ids("histream") == ["histream", *(m for m in MODES if m != "histream")]


@pytest.mark.parametrize(
    ("model", "mode", "expected"),
    [
        (None, None, ("tiny", "histream+")),
        ("tiny", "no-drc", ("tiny", "no-drc")),
        ("histream", None, ("histream", "histream")),
        ("self-forcing", "self-forcing", ("self-forcing", "self-forcing")),
    ],
)
def test_model_names_the_served_model_or_a_mode(model, mode, expected):
    body = VideoCreate(prompt="a fox", model=model, mode=mode)
    generation = resolve_video(body, TINY, "tiny", 16, 2000)
    assert (generation.model, generation.shape.mode.name) == expected


def test_a_mode_model_applies_its_sizes():
    # no-drc takes multiples of 16, the DRC modes multiples of 32
    body = SessionStart(prompt="a fox", model="no-drc", size="80x48")
    assert resolve_session(body, TINY, "tiny", 16, 2000).shape.width == 80
    with pytest.raises(InvalidArgument, match="height=48 must be a positive multiple of 32"):
        resolve_session(
            SessionStart(prompt="a fox", model="histream", size="80x48"), TINY, "tiny", 16, 2000
        )


@pytest.mark.parametrize(
    ("model", "mode", "param", "message"),
    [
        ("sora-2", None, "model", "model 'sora-2' is not served here; this server serves 'tiny'"),
        ("histream", "no-drc", "mode", "mode 'no-drc' contradicts model 'histream'"),
    ],
)
def test_bad_models_are_named(model, mode, param, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        resolve_video(VideoCreate(prompt="a fox", model=model, mode=mode), TINY, "tiny", 16, 2000)
    assert err.value.param == param
