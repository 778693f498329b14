"""Request validation at the gateway: which `model` ids a request may name and what they mean."""

from __future__ import annotations

import pytest

from histream_model import MODES, get_preset
from services.errors import InvalidArgument
from services.gateway.requests import (
    SessionStart,
    VideoCreate,
    check_prompt_update,
    endless_frames,
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


def test_a_prompt_update_reads_its_transition():
    update = check_prompt_update(
        {"prompt": " a heron ", "transition_chunks": "4", "interpolation": "slerp"}, 100
    )
    assert (update.text, update.transition_chunks, update.interpolation) == ("a heron", 4, "slerp")
    plain = check_prompt_update({"prompt": "a heron"}, 100)
    assert (plain.transition_chunks, plain.interpolation) == (1, "linear")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [({"transition_chunks": 0}, "transition_chunks", r"transition_chunks=0 must be in \[1, 64\]"),
     ({"transition_chunks": 65}, "transition_chunks", r"\[1, 64\]"),
     ({"transition_chunks": 2.5}, "transition_chunks", "whole number"),
     ({"interpolation": "cubic"}, "interpolation", r"'cubic' is unknown; choose one of"),
     ({"interpolation": 3}, "interpolation", "must be a string")],
)  # fmt: skip
def test_a_bad_transition_is_named(fields, param, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        check_prompt_update({"prompt": "a heron", **fields}, 100)
    assert err.value.param == param


def test_a_session_without_num_frames_is_endless_up_to_its_cap():
    cap = endless_frames(TINY, 16, 3600)
    assert cap == 1 + 4 * (3 * 4800 - 1)  # an hour at 16 fps, in whole 3-latent-frame chunks
    assert endless_frames(TINY, 16, 3600, max_frames=100) == 93  # a tenant's max_frames
    assert endless_frames(TINY, 16, 0) == 9  # at least one chunk
    endless = resolve_session(SessionStart(prompt="a fox"), TINY, "tiny", 16, 2000, cap)
    assert endless.endless and endless.shape.num_frames == cap
    bounded = resolve_session(
        SessionStart(prompt="a fox", num_frames=33), TINY, "tiny", 16, 2000, cap
    )
    assert not bounded.endless and bounded.shape.num_frames == 33
    legacy = resolve_session(SessionStart(prompt="a fox"), TINY, "tiny", 16, 2000)
    assert not legacy.endless and legacy.shape.num_frames == TINY.num_frames


def test_an_endless_session_needs_a_sliding_window_mode():
    body = SessionStart(prompt="a fox", mode="no-agsw")
    with pytest.raises(InvalidArgument, match="'no-agsw' keeps every frame") as err:
        resolve_session(body, TINY, "tiny", 16, 2000, endless_frames(TINY, 16, 60))
    assert err.value.param == "num_frames"


def test_a_prompt_update_may_ask_for_a_recache():
    assert check_prompt_update({"prompt": "a heron", "recache": True}, 100).recache is True
    assert check_prompt_update({"prompt": "a heron"}, 100).recache is False
    with pytest.raises(InvalidArgument, match="recache must be true or false") as err:
        check_prompt_update({"prompt": "a heron", "recache": "yes"}, 100)
    assert err.value.param == "recache"


def test_a_prompt_may_hold_tabs_and_newlines_but_no_other_control_character():
    """README, *HTTP*: text is UTF-8 without control characters; a prompt may hold tabs and
    newlines (other text fields may not)."""
    from services.gateway.requests import prompt_text, text

    prompt = "a fox\trunning\nthrough snow\r\n"
    assert prompt_text({"prompt": prompt}, "prompt") == prompt
    for char in ("\x00", "\x1b", "\x7f"):
        with pytest.raises(InvalidArgument, match=f"U\\+{ord(char):04X}") as bad:
            prompt_text({"prompt": f"a fox{char}"}, "prompt")
        assert bad.value.param == "prompt"
    with pytest.raises(InvalidArgument, match="U\\+0009"):
        text({"size": "192x\t128"}, "size")
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        prompt_text({"prompt": "a \ud800 fox"}, "prompt")
