"""Algorithm 1 from the paper, written here without caches: the cached generator must match it.

Nothing here comes from `histream_model.schedules` (no plans, phases, caches or flow schedule):
each denoising pass of chunk i is one cache-less `WanDiT.forward_full` over every clean frame
generated so far (at t = 0) and the noisy chunk (at its t_j), every frame at its absolute RoPE
position, with an explicit frame mask standing in for the caches:
- a frame of chunk b sees its own chunk and the context chunk b was generated against: the
  anchor frame and the `M - 1` frames before the chunk (AGSW, section 3.3), or every earlier
  frame (full history). The clean frames of earlier chunks thus get the keys and values their
  t = 0 commit wrote (lines 17-18), recomputed in the same pass;
- with DRC (section 3.2) the low-resolution passes see Down(x0) of every earlier chunk (line 18),
  the high-resolution ones x0;
- HiAR: one cache per step; step k's holds each earlier chunk's x0 of that step re-noised to
  step k + 1's level (the draw step k + 1 enters with at the same resolution, its own draw
  across a resolution change), clean after the last step;
- the steps (lines 5-12, 13-30): timesteps warped by the shift, x0 = x_t - sigma * flow,
  Psi(x0, eps, t) = (1 - sigma) x0 + sigma eps, Up of the last low-res x0 before the first
  high-res step; Up is bilinear per frame, Down a 2x2 mean, written here.
The model itself is shared (its parity with diffusers is tested elsewhere), and so is the noise
source: `chunk_noise(seed, chunk, draw)`, the noise of step `draw` of a chunk, a documented
interface. What is under test is everything around the model: schedule, caches, windows,
positions, hand-offs.

A prompt change (from chunk k on) leaves the earlier chunks' keys as their prompt made them, so
in a reference pass each frame attends to its own chunk's prompt (`prompts_per_frame` splits
the cross-attention by frame). A pass has one softmax scale, so chunks after a first chunk
generated with CineScale's attention scale cannot be recomputed in one pass: the multi-chunk
cases use scale 1, and the scale is checked on a first chunk alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from histream_model import PRESETS, build_dit
from histream_model.config import get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.rope import RopeAxes
from histream_model.schedules.flow import chunk_noise

TINY = PRESETS["tiny"]
UNSCALED = replace(TINY, options=replace(TINY.options, first_chunk_attn_scale=1.0))
H, W = 64, 96  # latents 8 x 12 (high) and 4 x 6 (low)
MODES = ("histream", "histream+", "no-drc", "no-agsw", "naive-2step", "self-forcing", "diagonal",
         "histream-diagonal", "hiar", "histream-hiar")  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dit(TINY).eval()


def prompt(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY.dit.text_len, TINY.dit.text_dim, generator=g)


def warp(step: float, shift: float) -> float:
    sigma = step / 1000
    return 1000 * shift * sigma / (1 + (shift - 1) * sigma)


def down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(x, (1, 2, 2))


def up(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
    return frames.reshape(b, f, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


def sees(frame_chunk: int, other: int, m: int, sliding: bool) -> bool:
    """May a frame of chunk `frame_chunk` attend to frame `other`?"""
    if other // m == frame_chunk:
        return True
    start = frame_chunk * m
    if not sliding:
        return other < start
    return other == 0 or start - (m - 1) <= other < start  # the anchor, then the M - 1 before


@contextlib.contextmanager
def prompts_per_frame(model, contexts: list[torch.Tensor], frame_prompt: list[int]):
    """Each latent frame's tokens cross-attend to `contexts[frame_prompt[f]]`."""
    texts = [model.text_kv(c) for c in contexts]
    for layer, block in enumerate(model.blocks):
        attend = block.cross_attn.forward

        def per_frame(x, k, v, layer=layer, attend=attend):
            n = x.shape[1] // len(frame_prompt)
            return torch.cat([
                attend(x[:, f * n : (f + 1) * n], texts[p].k[layer], texts[p].v[layer])
                for f, p in enumerate(frame_prompt)
            ], dim=1)  # fmt: skip

        block.cross_attn.forward = per_frame
    try:
        yield
    finally:
        for block in model.blocks:
            del block.cross_attn.forward  # back to the class's method


def reference_pass(model, preset, sliding, history, x, t, ntk, scale, prompts) -> torch.Tensor:
    """x0 of the noisy chunk `x` at `t` after the `history`: (latent, t) per earlier chunk;
    `prompts[b]` is chunk b's prompt (the last is the noisy chunk's)."""
    m = x.shape[2]
    frames = torch.cat([h for h, _ in history] + [x], dim=2)
    total = frames.shape[2]
    mask = torch.tensor([[sees(f // m, g, m, sliding) for g in range(total)] for f in range(total)])
    times = torch.tensor([[tb for _, tb in history for _ in range(m)] + [t] * m])
    contexts = [prompt(p) for p in sorted(set(prompts))]
    frame_prompt = [sorted(set(prompts)).index(prompts[f // m]) for f in range(total)]
    with prompts_per_frame(model, contexts, frame_prompt):
        flow = model.forward_full(
            frames, times, contexts[0], rope=RopeAxes.build(preset.dit, ntk),
            frame_positions=list(range(total)), frame_mask=mask, scale=scale,
        )[:, :, total - m :]  # fmt: skip
    return x - t / 1000 * flow


def step_list(options, count: int) -> tuple[int, ...]:
    """The paper's 4-step list, HiStream+'s 2-step path; other counts evenly spaced from 1000."""
    fixed = {4: options.timesteps, 2: options.fast_timesteps}
    return fixed.get(count) or tuple(round(1000 * (count - k) / count) for k in range(count))


def reference(
    model,
    preset,
    mode_name: str,
    frames: int,
    seed: int,
    scale=None,
    change_at=None,
    rewrite_history=False,
) -> list:
    """Algorithm 1 (and Diagonal's and HiAR's context rules): each chunk's x0 (high
    resolution); from chunk `change_at` on, prompt 1 instead of prompt 0. `rewrite_history`:
    earlier chunks' keys as the current prompt would make them (not what the generator does;
    for contrast)."""
    mode, options = get_mode(mode_name), preset.options
    diagonal, hiar = mode.schedule == "diagonal", mode.schedule == "hiar"
    m = options.chunk_frames
    chunks = (frames - 1) // 4 // m + 1
    high = (1, 16, m, H // 8, W // 8)
    low_shape = (1, 16, m, H // 16, W // 16)
    # What each earlier chunk left in KV_high and KV_low: (latent, t) its keys were computed at.
    kv_high: list[tuple[torch.Tensor, float]] = []
    kv_low: list[tuple[torch.Tensor, float]] = []
    # HiAR: one cache per step; step k's holds each earlier chunk re-noised to step k + 1's
    # level (clean after the last step)
    kv_steps: dict[int, list[tuple[torch.Tensor, float]]] = {}
    outputs = []
    for i in range(chunks):
        low_steps, high_steps = mode.steps(i)
        if diagonal and not mode.dual_resolution:  # Diagonal: 5, 4, 3, then 2 steps
            counts = options.diagonal_steps
            low_steps, high_steps = 0, counts[min(i, len(counts) - 1)]
        ts = [warp(s, options.shift) for s in step_list(options, low_steps + high_steps)]
        x0 = None
        for j, t in enumerate(ts):
            is_low = j < low_steps
            eps = chunk_noise(seed, i, j, low_shape if is_low else high)
            if j == 0:
                x = eps
            else:
                previous = up(x0) if j == low_steps else x0
                x = (1 - t / 1000) * previous + t / 1000 * eps
            ntk = (options.low if is_low else options.high).ntk_factors
            step_scale = scale if (i == 0 and not is_low) else None
            history = kv_steps.setdefault(j, []) if hiar else kv_low if is_low else kv_high
            prompts = [int(change_at is not None and b >= change_at) for b in range(i + 1)]
            if rewrite_history:
                prompts = [prompts[-1]] * len(prompts)
            x0 = reference_pass(
                model, preset, mode.sliding_window, history, x, t, ntk, step_scale, prompts
            )
            if hiar:
                if j + 1 == len(ts):
                    kv_steps[j].append((x0, 0.0))
                    continue
                # the next step's own draw when it stays at this resolution; else one of its own
                draw = j + 1 if (j + 1 < low_steps) == is_low else 100 + j + 1
                noise = chunk_noise(seed, i, draw, x0.shape)
                kv_steps[j].append(((1 - ts[j + 1] / 1000) * x0 + ts[j + 1] / 1000 * noise,
                                    ts[j + 1]))  # fmt: skip
        # Algorithm 1 lines 17-18: commit x0 (and Down(x0)) at t = 0; Diagonal: a later chunk
        # keeps the keys of its last high-res pass, on that pass's input at its timestep.
        kv_high.append((x, ts[-1]) if diagonal and i > 0 else (x0, 0.0))
        kv_low.append((down(x0), 0.0))
        outputs.append(x0)
    return outputs


def generated(model, preset, mode: str, frames: int, seed: int, change_at=None) -> list:
    generator = HiStreamGenerator(model, preset, mode)
    state = generator.start(prompt(), H, W, frames, seed)
    out = []
    while not state.done:
        if len(out) == change_at:
            generator.set_prompt(state, prompt(1))
        out.append(generator.step(state).latents)
    return out


@pytest.mark.parametrize("frames", [21, 45])  # 2 chunks; 4 chunks (the window slides twice)
@pytest.mark.parametrize("mode", MODES)
def test_the_cached_generator_is_algorithm_1(model, mode, frames):
    ours = generated(model, UNSCALED, mode, frames, seed=3)
    paper = reference(model, UNSCALED, mode, frames, seed=3)
    assert len(ours) == len(paper) == (frames - 1) // 12 + 1
    for i, (a, b) in enumerate(zip(ours, paper, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{mode}, chunk {i}")


@pytest.mark.parametrize("mode", ["histream", "histream+", "self-forcing", "diagonal"])
def test_a_prompt_change_conditions_later_chunks_and_leaves_earlier_keys(model, mode):
    ours = generated(model, UNSCALED, mode, 45, seed=4, change_at=2)
    paper = reference(model, UNSCALED, mode, 45, seed=4, change_at=2)
    for i, (a, b) in enumerate(zip(ours, paper, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{mode}, chunk {i}")
    unchanged = reference(model, UNSCALED, mode, 45, seed=4)
    assert torch.equal(ours[1], generated(model, UNSCALED, mode, 45, seed=4)[1])
    assert not torch.allclose(ours[2], unchanged[2], atol=1e-3)  # the new prompt steers chunk 3
    # ... and chunk 3 sees chunks 1-2's keys as the old prompt made them: the same history
    # with its keys recomputed under the new prompt gives another chunk 3
    rewritten = reference(model, UNSCALED, mode, 45, seed=4, change_at=2, rewrite_history=True)
    torch.testing.assert_close(rewritten[1], paper[1])
    assert not torch.allclose(ours[2], rewritten[2], atol=1e-3)


@pytest.mark.parametrize("mode", ["histream", "self-forcing"])
def test_the_first_chunk_takes_cinescales_attention_scale_at_high_resolution(model, mode):
    c, d = TINY.options.first_chunk_attn_scale, TINY.dit.head_dim
    n_ref = (H // 16 // 2) * (W // 16 // 2)  # low-res tokens per latent frame
    scale = math.log(n_ref * c) / math.log(n_ref) / math.sqrt(d)
    assert c == 2.0
    ours = generated(model, TINY, mode, 9, seed=5)
    paper = reference(model, TINY, mode, 9, seed=5, scale=scale)
    torch.testing.assert_close(ours[0], paper[0], rtol=1e-4, atol=1e-4)
    unscaled = reference(model, TINY, mode, 9, seed=5)
    assert not torch.allclose(ours[0], unscaled[0], atol=1e-3)  # the scale matters here
