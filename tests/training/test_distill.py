"""Distilling the first chunk's draw: the teacher's many-step solve and the student's pairs."""

from __future__ import annotations

from dataclasses import replace

import torch

from histream_model.config import DiTConfig, Resolution, VAEConfig, get_preset
from histream_model.dit import build_dit
from histream_model.rope import RopeAxes
from histream_model.text import BuiltinTextEncoder
from histream_model.vae import WanVAE
from training.distill import ode_pairs, solve_levels
from training.dit import encode_clips, train_dit


def _preset():
    dit = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=1, text_dim=16,
                    text_len=32)  # fmt: skip
    vae = VAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
    return replace(get_preset("toy"), dit=dit, vae=vae, height=64, width=96)


def _clips(preset, count=3):
    torch.manual_seed(0)
    text = BuiltinTextEncoder(preset.dit.text_dim, preset.dit.text_len, 512)
    return encode_clips(preset, WanVAE(preset.vae).eval(), text, count=count, frames=21, seed=0)


class ExactTeacher:
    """A flow that carries every x_sigma straight to a target set by the prompt: v = (x - c) / s,
    so an Euler solve lands on c exactly, whatever its step count or the noise."""

    def forward_full(self, x, t, context, rope=None):
        sigma = (t / 1000.0).view(-1, 1, 1, 1, 1)
        target = context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (x - target) / sigma


def test_the_solve_runs_from_pure_noise_to_clean_and_visits_shifted_levels() -> None:
    levels = solve_levels(2.0, 4)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and levels == sorted(levels, reverse=True)
    assert abs(levels[2] - 2 * 0.5 / 1.5) < 1e-12  # the shift warps u = 0.5 to 2/3


def test_pairs_hold_the_teachers_solve_of_their_noise_under_their_prompt() -> None:
    preset = _preset()
    clips = _clips(preset)
    pairs = ode_pairs(ExactTeacher(), preset, clips, count=5, steps=7, seed=1, batch=2)
    assert pairs.count == 5
    for resolution in Resolution:
        h, w = clips.latents[resolution].shape[-2:]
        assert pairs.noise[resolution].shape == (5, 16, 3, h, w)
        want = pairs.context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        assert torch.allclose(pairs.samples[resolution], want.expand(5, 16, 3, h, w), atol=1e-5)
        assert pairs.noise[resolution].std() > 0.9  # pure noise, not the samples
    # every pair's prompt is one of the clips'
    assert all(any(torch.equal(c, k) for k in clips.context) for c in pairs.context)
    again = ode_pairs(ExactTeacher(), preset, clips, count=5, steps=7, seed=1, batch=5)
    assert torch.equal(again.noise[Resolution.LOW], pairs.noise[Resolution.LOW])


def test_a_student_learns_the_pairs_at_the_top_level_of_first_chunks() -> None:
    preset = _preset()
    clips = _clips(preset)
    pairs = ode_pairs(ExactTeacher(), preset, clips, count=4, steps=2, seed=1)
    for resolution in Resolution:  # a sample far from the clips' own latents
        pairs.samples[resolution] = torch.full_like(pairs.samples[resolution], 3.0)

    def top_level_error(model) -> float:
        x = pairs.noise[Resolution.LOW]
        t = torch.full((x.shape[0],), 1000.0)
        rope = RopeAxes.build(preset.dit, preset.options.at(Resolution.LOW).ntk_factors)
        with torch.no_grad():
            x0 = x - model.forward_full(x, t, pairs.context, rope=rope)
        return (x0 - 3.0).pow(2).mean().item()

    start = build_dit(preset.dit, seed=0)
    before = top_level_error(start)
    model, _ = train_dit(preset, clips, steps=60, seed=0, batch=2, lr=3e-3, start=start,
                         first_chunk_share=1.0, top_level_share=1.0, pairs=pairs)  # fmt: skip
    assert top_level_error(model) < 0.2 * before
    # without pairs the same training learns the clips instead, not the pairs' sample
    plain, _ = train_dit(preset, clips, steps=60, seed=0, batch=2, lr=3e-3,
                         first_chunk_share=1.0, top_level_share=1.0)  # fmt: skip
    assert top_level_error(plain) > 0.5 * before


def test_a_guided_solve_lands_on_the_guided_target() -> None:
    """Guidance g mixes the teacher's conditional flow (towards c) with its unconditional one
    (the zero prompt: towards 0): the guided flow carries x to g * c."""
    preset = _preset()
    clips = _clips(preset)
    pairs = ode_pairs(ExactTeacher(), preset, clips, count=3, steps=5, seed=1, guidance=2.5)
    want = 2.5 * pairs.context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    got = pairs.samples[Resolution.HIGH]
    assert torch.allclose(got, want.expand_as(got), atol=1e-4)


def test_prompt_dropout_shows_the_model_the_empty_prompt_that_often() -> None:
    preset = _preset()
    clips = _clips(preset)
    model = build_dit(preset.dit, seed=0)
    seen = []
    forward = model.forward_full

    def recording(x, t, context, **kwargs):
        seen.append(context.detach().flatten(1).abs().sum(1) == 0)
        return forward(x, t, context, **kwargs)

    model.forward_full = recording
    train_dit(preset, clips, steps=40, seed=0, batch=2, start=model, prompt_dropout=0.25)
    empty = torch.cat(seen).float().mean().item()
    assert 0.15 < empty < 0.35, empty  # 120 examples, 25% asked
    seen.clear()
    train_dit(preset, clips, steps=40, seed=0, batch=1, start=model)
    assert not torch.cat(seen).any()
