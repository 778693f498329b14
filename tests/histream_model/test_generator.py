"""Algorithm 1: modes, determinism, AGSW vs full history, prompt changes, split state."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from histream_model import MODES, PRESETS, build_dit
from histream_model.config import Resolution, get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.schedules import Entry, handoff, new_session_states, plan_chunk, run_phase
from histream_model.shape import VideoShape

TINY = PRESETS["tiny"]
H, W = 64, 96  # small: 4 x 6 low-res and 8 x 12 high-res latents


@pytest.fixture(scope="module")
def model():
    return build_dit(TINY)


def context(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY.dit.text_len, TINY.dit.text_dim, generator=g)


def run(model, mode="histream", preset=TINY, frames=33, seed=0, ctx=None):
    gen = HiStreamGenerator(model, preset, mode)
    return list(gen.generate(context() if ctx is None else ctx, H, W, frames, seed))


def latents(chunks) -> torch.Tensor:
    return torch.cat([c.latents for c in chunks], dim=2)


# (low passes, high passes) per chunk, commits included: the paper's Algorithm 1 with
# 2 + 2 steps (DRC), 4 high-res steps (no DRC), and HiStream+'s 1 + 1 after the first chunk.
PAPER_PASSES = {
    "histream": ((3, 3), (3, 3)),
    "histream+": ((3, 3), (2, 2)),
    "no-drc": ((0, 5), (0, 5)),
    "no-agsw": ((3, 3), (3, 3)),
    "naive-2step": ((2, 2), (2, 2)),
    "self-forcing": ((0, 5), (0, 5)),
}


@pytest.mark.parametrize("mode", list(PAPER_PASSES))
def test_passes_per_chunk_match_the_paper(model, mode):
    chunks = run(model, mode)
    first, later = PAPER_PASSES[mode]
    assert (chunks[0].low_passes, chunks[0].high_passes) == first
    for c in chunks[1:]:
        assert (c.low_passes, c.high_passes) == later
    low_steps_first = get_mode(mode).first_chunk_steps[0]
    assert chunks[0].low_steps == low_steps_first
    assert chunks[0].high_steps == first[1] - 1
    assert torch.isfinite(latents(chunks)).all()


def test_same_seed_same_latents_other_seed_differs(model):
    a, b, c = latents(run(model)), latents(run(model)), latents(run(model, seed=1))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_window_covering_the_video_equals_full_history(model):
    wide = replace(TINY, options=replace(TINY.options, window_frames=30))
    agsw = latents(run(model, "histream", wide, frames=33))
    full = latents(run(model, "no-agsw", TINY, frames=33))
    assert torch.equal(agsw, full)
    # while the paper's window (anchor 1 + 2 recent) does change later chunks
    narrow = latents(run(model, "histream", TINY, frames=33))
    assert torch.equal(narrow[:, :, :6], full[:, :, :6])
    assert (narrow[:, :, 6:] - full[:, :, 6:]).abs().max() > 1e-4


def test_kv_bytes_constant_under_agsw_linear_in_full_history(model):
    sizes = {}
    for frames in (33, 57, 81):
        for mode in ("histream", "no-agsw"):
            chunks = run(model, mode, frames=frames)
            assert len({tuple(c.kv_bytes.values()) for c in chunks}) == 1  # preallocated
            sizes[mode, frames] = sum(chunks[0].kv_bytes.values())
    assert sizes["histream", 33] == sizes["histream", 57] == sizes["histream", 81]
    latent = {33: 9, 57: 15, 81: 21}
    per_frame = {f: sizes["no-agsw", f] / latent[f] for f in latent}
    assert per_frame[33] == per_frame[57] == per_frame[81]
    # AGSW holds anchor 1 + window 2 + chunk 3 = 6 frames at each resolution
    assert sizes["histream", 81] == per_frame[81] * 6


def test_prompt_change_applies_from_the_next_chunk(model):
    gen = HiStreamGenerator(model, TINY, "histream+")
    state = gen.start(context(0), H, W, 33, seed=0)
    changed = [gen.step(state)]
    gen.set_prompt(state, context(1))
    changed += [gen.step(state), gen.step(state)]
    same = run(model, "histream+", ctx=context(0))
    assert torch.equal(changed[0].latents, same[0].latents)
    assert (changed[1].latents - same[1].latents).abs().mean() > 1e-3


@pytest.mark.parametrize("mode", list(MODES))
def test_split_state_steps_equal_the_in_process_generator(model, mode):
    """A caller holding each resolution's caches apart (as the stages do), running each phase
    on the state of its cache and handing the latents over in their wire form, gets the same
    latents."""
    shape = VideoShape(TINY, get_mode(mode), H, W, 33)
    options = TINY.options
    apart = {res: new_session_states(model, shape, context(), resolution=res) for res in Resolution}
    outs = []
    for i in range(shape.num_chunks):
        plan = plan_chunk(shape, i)
        received = None
        for k, phase in enumerate(plan.phases):
            state = apart[phase.resolution][phase.cache]
            result = run_phase(model, state, plan, phase, options, seed=0, received=received)
            if k == plan.output:
                outs.append(result.latents)
            if k + 1 < len(plan.phases):
                received = handoff(shape, plan.phases[k + 1], result.latents)
                if plan.phases[k + 1].entry == Entry.DOWNSAMPLE:  # Down(x0) travels, not x0
                    assert received.shape[-2:] == shape.low_latent_hw
    assert torch.equal(torch.cat(outs, dim=2), latents(run(model, mode)))
    states = [s for held in apart.values() for s in held.values()]
    assert all(s.cache.frames_committed == shape.latent_frames for s in states)
    phase = plan.phases[0]
    for wrong in (s for s in states if s.name != phase.cache):
        with pytest.raises(ValueError, match=f"a phase on cache '{phase.cache}' cannot run on"):
            run_phase(model, wrong, plan, phase, options, seed=0)


def test_plan_scales_attention_on_the_first_chunk_only():
    shape = VideoShape(TINY, get_mode("histream+"), H, W, 33)
    first, second = plan_chunk(shape, 0), plan_chunk(shape, 1)
    n_ref = 2 * 3  # low-res tokens per frame: 4 x 6 latent / patch 2
    import math

    high_scale = [p.scale for p in first.phases if p.resolution == Resolution.HIGH]
    assert high_scale == [pytest.approx(math.log(2 * n_ref) / math.log(n_ref) / math.sqrt(32))]
    assert all(p.scale is None for p in second.phases)
    assert all(p.scale is None for p in first.phases if p.resolution == Resolution.LOW)
    assert len(first.timesteps("low")) == 2 and len(second.timesteps("low")) == 1
    assert first.timesteps("low")[0] == 1000.0
    with pytest.raises(ValueError, match="chunk index 3"):
        plan_chunk(shape, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 72}, "height=72 must be a positive multiple of 32"),
        ({"width": 100}, "width=100 must be a positive multiple of 32"),
        ({"num_frames": 80}, "num_frames=80 must be 1 \\+ 4k"),
        ({"num_frames": 41}, "num_frames=41 gives 11 latent frames"),
        ({"num_frames": 0}, "num_frames=0"),
    ],
)
def test_bad_sizes_fail_before_model_work(model, kwargs, message):
    gen = HiStreamGenerator(model, TINY, "histream")
    args = {"height": H, "width": W, "num_frames": 33} | kwargs
    with pytest.raises(ValueError, match=message):
        gen.start(context(), **args)


def test_no_drc_modes_accept_the_finer_size_multiple(model):
    gen = HiStreamGenerator(model, TINY, "self-forcing")
    state = gen.start(context(), 48, 80, 9)  # multiples of 16, not of 32
    assert gen.step(state).latents.shape == (1, 16, 3, 6, 10)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        HiStreamGenerator(model, TINY, "fast")


def test_every_size_the_checks_accept_runs(model):
    """No accepted size can fail inside the model: each small size either is refused by the
    shape check (naming the value) or generates a chunk, in every mode."""
    from histream_model import MODES

    accepted = 0
    for mode in MODES:
        gen = HiStreamGenerator(model, TINY, mode)
        for height in range(16, 97, 16):
            for width in range(16, 97, 16):
                try:
                    state = gen.start(context(), height, width, 9)
                except ValueError as err:
                    assert f"{height}" in str(err) or f"{width}" in str(err)
                    continue
                assert gen.step(state).latents.shape[-2:] == (height // 8, width // 8)
                accepted += 1
    assert accepted > 30


@pytest.mark.parametrize("mode", ["histream+", "hiar"])
def test_a_bfloat16_model_generates_what_the_float32_one_does(mode):
    """The GPU deployment runs the DiT in bfloat16: every pass must take bf16 weights with its
    float32 time embedding and norms (a float32 input to a bf16 layer used to fail), and give
    what the float32 model gives, to bf16 precision."""
    ctx = context()
    want = latents(run(build_dit(TINY), mode, ctx=ctx))
    got = latents(run(build_dit(TINY, dtype=torch.bfloat16), mode, ctx=ctx))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cosine > 0.99
