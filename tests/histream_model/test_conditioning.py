"""Prompt transitions: the blends, which chunk is under which conditioning, and the generator
applying them chunk by chunk."""

from __future__ import annotations

import math

import pytest
import torch

from histream_model import PRESETS, build_dit
from histream_model.conditioning import (
    MAX_TRANSITION_CHUNKS,
    PromptChange,
    blend,
    cache_conditioning,
    conditioning,
    in_transition,
    text_changes_at,
)
from histream_model.generator import HiStreamGenerator

TINY = PRESETS["tiny"]
H, W = 64, 96


def ctx(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY.dit.text_len, TINY.dit.text_dim, generator=g)


def test_linear_blend_is_the_weighted_sum():
    a, b = ctx(0), ctx(1)
    assert torch.allclose(blend(a, b, 0.25, "linear"), 0.75 * a + 0.25 * b, atol=1e-6)
    assert blend(a, b, 0.0, "slerp") is not None and torch.equal(blend(a, b, 0.0, "slerp"), a)
    assert torch.equal(blend(a, b, 1.0, "linear"), b)


def test_slerp_turns_along_the_arc_and_scales_the_norm_linearly():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
    out = blend(a, b, 1 / 3, "slerp")
    # row 0: a third of the way round a right angle (30 degrees), norm 1 -> 3 a third of the way
    angle = math.atan2(out[0, 1].item(), out[0, 0].item())
    assert angle == pytest.approx(math.pi / 6, abs=1e-5)
    assert out[0].norm().item() == pytest.approx(1 + (3 - 1) / 3, abs=1e-5)
    # row 1: a zero vector (padding) and row 2: parallel vectors blend linearly
    assert torch.allclose(out[1:], torch.lerp(a[1:], b[1:], 1 / 3), atol=1e-6)
    # the linear blend of row 0 is shorter than the arc's
    assert torch.lerp(a, b, 1 / 3)[0].norm() < out[0].norm()


def test_a_transition_reaches_the_new_prompt_after_its_chunks():
    a, b = ctx(0), ctx(1)
    changes = [PromptChange(0, a), PromptChange(2, b, transition_chunks=3)]
    assert conditioning(changes, 1) is a
    assert torch.allclose(conditioning(changes, 2), torch.lerp(a, b, 1 / 3), atol=1e-6)
    assert torch.allclose(conditioning(changes, 3), torch.lerp(a, b, 2 / 3), atol=1e-6)
    assert conditioning(changes, 4) is b and conditioning(changes, 40) is b
    assert [in_transition(changes, c) for c in range(6)] == [0, 0, 1, 1, 0, 0]
    assert [text_changes_at(changes, c) for c in range(6)] == [0, 0, 1, 1, 1, 0]


def test_a_change_during_a_transition_starts_from_where_it_stood():
    a, b, c = ctx(0), ctx(1), ctx(2)
    changes = [PromptChange(0, a), PromptChange(2, b, 4, "slerp"), PromptChange(3, c, 2)]
    at_2 = blend(a, b, 1 / 4, "slerp")
    assert torch.equal(conditioning(changes, 2), at_2)
    assert torch.equal(conditioning(changes, 3), blend(at_2, c, 1 / 2, "linear"))
    assert conditioning(changes, 4) is c


@pytest.mark.parametrize(
    ("chunks", "interpolation", "named"),
    [(0, "linear", "transition_chunks=0"), (MAX_TRANSITION_CHUNKS + 1, "linear", "[1, 64]"),
     (2, "cubic", "'cubic'"), (True, "linear", "integer")],
)  # fmt: skip
def test_a_bad_transition_is_named(chunks, interpolation, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        PromptChange(1, ctx(0), chunks, interpolation)


def test_the_generator_blends_the_text_over_the_transition():
    """A transition over 3 chunks equals cutting to each chunk's blend by hand, and differs
    from a plain cut at the chunk it starts on."""
    model = build_dit(TINY)
    gen = HiStreamGenerator(model, TINY, "histream+")
    a, b = ctx(0), ctx(1)

    def session(change) -> list[torch.Tensor]:
        state = gen.start(a, H, W, 57, seed=3)
        out = []
        for i in range(state.shape.num_chunks):
            change(state, i)
            out.append(gen.step(state).latents)
        return out

    def smooth(state, i):
        if i == 1:
            gen.set_prompt(state, b, transition_chunks=3, interpolation="slerp")

    def by_hand(state, i):
        weights = {1: 1 / 3, 2: 2 / 3, 3: 1.0}
        if i in weights:
            gen.set_prompt(state, blend(a, b, weights[i], "slerp"))

    def cut(state, i):
        if i == 1:
            gen.set_prompt(state, b)

    blended, manual, hard = session(smooth), session(by_hand), session(cut)
    for x, y in zip(blended, manual, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(blended[0], hard[0])
    assert (blended[1] - hard[1]).abs().mean() > 1e-3


def test_a_recache_moves_the_earlier_chunks_cache_entries_to_its_conditioning():
    a, b = ctx(0), ctx(1)
    changes = [PromptChange(0, a), PromptChange(3, b, 2, "slerp", recache=True)]
    # before the change applied, entries are their chunk's own
    assert cache_conditioning(changes, 1, 3 - 1) is a
    # once it applied (chunk 3 on), entries of chunks before 3 hold chunk 3's conditioning
    assert torch.equal(cache_conditioning(changes, 1, 3), blend(a, b, 1 / 2, "slerp"))
    assert torch.equal(cache_conditioning(changes, 2, 9), conditioning(changes, 3))
    assert cache_conditioning(changes, 4, 9) is b  # after it: their own


def test_the_generator_recaches_the_window_under_the_new_prompt():
    """With recache, the chunk after the change differs from a plain cut (the window's caches
    were rebuilt under the new prompt); the chunks before it are the same."""
    model = build_dit(TINY)
    gen = HiStreamGenerator(model, TINY, "histream+")
    a, b = ctx(0), ctx(1)

    def session(recache: bool) -> list[torch.Tensor]:
        state = gen.start(a, H, W, 57, seed=3)
        out = [gen.step(state).latents for _ in range(3)]
        gen.set_prompt(state, b, recache=recache)
        return out + [gen.step(state).latents for _ in range(2)]

    cut, recached = session(False), session(True)
    assert all(torch.equal(x, y) for x, y in zip(cut[:3], recached[:3], strict=True))
    assert (cut[3] - recached[3]).abs().mean() > 1e-4
    full = HiStreamGenerator(model, TINY, "no-agsw")
    with pytest.raises(ValueError, match="recache needs a sliding-window mode"):
        full.set_prompt(full.start(a, H, W, 33), b, recache=True)
