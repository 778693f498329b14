"""Training the toy preset's causal DiT: flow matching on VAE latents with teacher forcing.

Data: procedural clips encoded once by the trained VAE (`encode_clips`); the low-resolution
latents are Down(x0) of the high-resolution ones, exactly what dual-resolution caching hands the
structure steps and commits into KV_low.

A training example is one chunk of `chunk_frames` latent frames at a noise level the few-step
sampler uses, after clean context frames (teacher forcing), in one cache-less pass with a
block-causal frame mask (`forward_full(frame_mask=..., frame_positions=...)`):
- the sliding-window layout (AGSW): the anchor frame, then the last `window_frames` frames before
  the chunk; their positions may be pushed later by a random gap, so long videos (a window far
  from the anchor) are in the training distribution;
- the full-history layout (Self-Forcing, no-AGSW): every earlier frame of the clip.
Context frames see their own and earlier chunks; the noisy chunk sees the context and itself.
Each batch is at the low or the high resolution, with that resolution's NTK factors. The loss is
the MSE of the predicted flow (eps - x0) on the noisy chunk. Each clip is rolled so its scene
sits on a token: where the noise peaks when a first chunk is drawn from pure noise
(`noise_peak`), a random one otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from histream_model.config import Preset, Resolution
from histream_model.dit import WanDiT, build_dit
from histream_model.rope import RopeAxes
from histream_model.schedules.execute import downsample
from histream_model.schedules.flow import FlowSchedule
from histream_model.text import BuiltinTextEncoder
from histream_model.vae import WanVAE
from training.data import Scene, render, sample_scene
from training.optim import Optimiser, Progress

if TYPE_CHECKING:
    from training.distill import Pairs

FIRST_CHUNK_SHARE = 0.35
# Context frames are given with a little noise in half the examples (still as t = 0): at
# inference they are the model's own predictions, not the VAE's encodings.
CONTEXT_NOISE, CONTEXT_NOISE_SHARE = 0.1, 0.5
# Where a first chunk's scene sits when it is drawn from pure noise: see `noise_peak`.
# The share of examples at the sampler's first level (pure noise): there the model alone draws
# the scene from the prompt, and every later step only refines what it drew. Uniform over the
# 10 levels it got a tenth, and a model trained so drew the background and no object.
TOP_LEVEL_SHARE = 0.3


@dataclass
class LatentClips:
    """Encoded clips: normalised latents per resolution and the prompts' text context."""

    latents: dict[Resolution, Tensor]  # (N, z, T, h, w) per resolution
    context: Tensor  # (N, text_len, text_dim)
    scenes: list[Scene]


@torch.no_grad()
def encode_clips(
    preset: Preset,
    vae: WanVAE,
    text: BuiltinTextEncoder,
    count: int,
    frames: int,
    seed: int,
    batch: int = 8,
    progress: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
) -> LatentClips:
    """`count` random clips of `frames` video frames at the preset's size, encoded (by the VAE
    on its device: the latents and text context are left there)."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng.randrange(2**31), placed=True) for _ in range(count)]
    high = []
    for first in range(0, count, batch):
        group = scenes[first : first + batch]
        videos = torch.stack(
            [render(s, preset.height, preset.width, frames).transpose(0, 1) for s in group]
        )  # (B, 3, T, H, W)
        high.append(vae.encode(videos.to(device)))
        if progress is not None:
            progress(len(group))
    latents = torch.cat(high)
    factor = preset.options.low_res_factor
    low_hw = (latents.shape[3] // factor, latents.shape[4] // factor)
    context = text.encode([s.prompt for s in scenes]).to(device)
    return LatentClips(
        latents={Resolution.HIGH: latents, Resolution.LOW: downsample(latents, low_hw)},
        context=context,
        scenes=scenes,
    )


def sampler_timesteps(preset: Preset, max_steps: int = 5) -> tuple[float, ...]:
    """Every timestep a mode evaluates the model at: the warped 1..max_steps step lists."""
    options = preset.options
    flow = FlowSchedule(options.shift, options.num_train_timesteps)
    levels = {t for n in range(1, max_steps + 1) for t in flow.warp(options.step_list(n))}
    return tuple(sorted(levels))


def noise_peak(eps: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, 2) token (row, column) where the first latent frame's patch-summed noise peaks.

    Why the scene is placed there: the DiT sees positions only through RoPE, which is relative, so
    from pure noise it cannot tell the frame's centre from any other place; trained to draw a
    scene at a fixed place, its prediction is the mean over places, a background with no object
    (measured: object MSE 1.59 against an object variance of 1.74 at the top level). A place read
    off the noise it sees can be found by any token (one patch sum, one attention to the
    largest), so at the top level the scene is drawn where this peak is, a sample, not a mean.
    """
    _, ph, pw = patch
    sums = F.avg_pool2d(eps[:, :, 0].sum(1, keepdim=True), (ph, pw))  # (B, 1, rows, cols)
    flat = sums.flatten(1).argmax(1)
    cols = sums.shape[-1]
    return torch.stack([flat // cols, flat % cols], dim=1)


def centre_on(latents: Tensor, tokens: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """Placed clips' latents (B, z, T, h, w) rolled so the frame's centre lands on each token's.

    The scenes wrap around the frame edges, so a roll of their latents is (up to the VAE's
    zero padding at the edges) the latent of the same scene started elsewhere.
    """
    _, ph, pw = patch
    h, w = latents.shape[-2:]
    rows = [
        torch.roll(clip, (int(r) * ph + ph // 2 - h // 2, int(c) * pw + pw // 2 - w // 2), (-2, -1))
        for clip, (r, c) in zip(latents, tokens.tolist(), strict=True)
    ]
    return torch.stack(rows)


@dataclass(frozen=True)
class Layout:
    """Which frames an example shows the model, where they sit, and how they may attend."""

    context: tuple[int, ...]  # clip frames given clean, in order
    chunk: tuple[int, ...]  # clip frames to denoise
    positions: tuple[int, ...]  # RoPE frame position of each (context, then chunk)
    mask: Tensor  # (F, F) bool: frame i may attend to frame j


def layout(chunk: int, options: object, sliding: bool, gap: int) -> Layout:
    """The frames of one example: chunk `chunk` after its context (see the module docs)."""
    m = options.chunk_frames  # type: ignore[attr-defined]
    start = chunk * m
    if not sliding or chunk == 0:
        context = tuple(range(start))
    else:
        anchor = tuple(range(options.anchor_frames))  # type: ignore[attr-defined]
        window = tuple(range(start - options.window_frames, start))  # type: ignore[attr-defined]
        context = tuple(dict.fromkeys(anchor + window))
    frames = (*context, *range(start, start + m))
    anchor_end = options.anchor_frames  # type: ignore[attr-defined]
    # Only the sliding window can sit far from its anchor; a full history is contiguous.
    pushed = sliding and chunk >= 2
    positions = tuple(f + (gap if pushed and f >= anchor_end else 0) for f in frames)
    blocks = torch.tensor([f // m for f in frames])
    mask = blocks[None, :] <= blocks[:, None]
    return Layout(context, tuple(range(start, start + m)), positions, mask)


def draw_levels(
    rng: random.Random, size: int, levels: Sequence[float], top_share: float, shift: float | None
) -> Tensor:
    """`size` training timesteps: the top level with probability `top_share`, else one of the
    sampler's `levels`, or (`shift` given: a teacher's continuous training) a uniform noise level
    warped by the shift, as a many-step solve visits them."""
    out = []
    for _ in range(size):
        if rng.random() < top_share:
            out.append(levels[-1])
        elif shift is None:
            out.append(rng.choice(levels))
        else:
            u = 1.0 - rng.random()  # (0, 1]
            out.append(1000.0 * shift * u / (1 + (shift - 1) * u))
    return torch.tensor(out)


def train_dit(
    preset: Preset,
    clips: LatentClips,
    steps: int,
    seed: int,
    batch: int = 8,
    lr: float = 1e-3,
    max_gap: int = 100,
    progress: Progress | None = None,
    start: WanDiT | None = None,
    first_chunk_share: float = FIRST_CHUNK_SHARE,
    top_level_share: float = TOP_LEVEL_SHARE,
    continuous: bool = False,
    pairs: Pairs | None = None,
    prompt_dropout: float = 0.0,
) -> tuple[WanDiT, list[float]]:
    """The preset's DiT trained for `steps` AdamW steps from `seed` (from scratch, or on from
    `start`, in place), on the clips' device; returns it and the losses. The shares: of examples
    at a first chunk, and of noise levels at the top one. `continuous` trains at every noise
    level (a teacher for `training.distill`); with `pairs`, a first chunk drawn from pure noise
    learns the teacher's sample of that noise instead of a clip placed by `noise_peak`. A share
    `prompt_dropout` of examples gets the empty (all-zero) text context, so the model also
    learns the unconditional flow that classifier-free guidance needs."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    device = clips.context.device
    model = (start or build_dit(preset.dit, seed=seed)).to(device).train().requires_grad_(True)
    optimiser = Optimiser(model.parameters(), lr, steps, weight_decay=0.01)
    options = preset.options
    levels = sampler_timesteps(preset)
    shift = options.shift if continuous else None
    ropes = {res: RopeAxes.build(preset.dit, options.at(res).ntk_factors) for res in Resolution}
    patch = preset.dit.patch_size
    count, _, total_frames = clips.latents[Resolution.HIGH].shape[:3]
    num_chunks = total_frames // options.chunk_frames
    if num_chunks < 2:
        raise ValueError(
            f"clips of {total_frames} latent frames hold {num_chunks} chunk(s) of "
            f"{options.chunk_frames}; training needs at least 2 (a first chunk and a later one)"
        )
    for step in range(steps):
        resolution = Resolution.HIGH if step % 2 else Resolution.LOW
        size = batch if resolution == Resolution.HIGH else 2 * batch
        sliding = rng.random() < 0.6
        gap = rng.randrange(max_gap + 1) if sliding and rng.random() < 0.5 else 0
        # Chunk 1 is where the prompt alone decides the scene: a third of the examples.
        chunk = 0 if rng.random() < first_chunk_share else rng.randrange(1, num_chunks)
        example = layout(chunk, options, sliding, gap)
        index = torch.tensor([rng.randrange(count) for _ in range(size)], device=device)
        latents = clips.latents[resolution][index]  # (B, z, T, h, w), scenes centred
        eps = torch.randn((*latents.shape[:2], options.chunk_frames, *latents.shape[3:]),
                          generator=generator)  # fmt: skip
        t = draw_levels(rng, size, levels, top_level_share, shift)
        # Each scene moves to a token: where the noise peaks when a first chunk is drawn from
        # pure noise, anywhere (uniformly) otherwise, where the place is seen in x_t or context.
        rows, cols = latents.shape[3] // patch[1], latents.shape[4] // patch[2]
        tokens = torch.stack([torch.randint(0, n, (size,), generator=generator)
                              for n in (rows, cols)], dim=1)  # fmt: skip
        drawn = (t == levels[-1]) if chunk == 0 else torch.zeros(size, dtype=torch.bool)
        if pairs is None and bool(drawn.any()):
            tokens[drawn] = noise_peak(eps[drawn], patch)
        latents = centre_on(latents, tokens, patch)
        text = clips.context[index]
        if prompt_dropout:
            dropped = torch.tensor([rng.random() < prompt_dropout for _ in range(size)])
            text[dropped.to(device)] = 0.0
        eps, t = eps.to(device), t.to(device)
        x0 = latents[:, :, list(example.chunk)]
        if pairs is not None and bool(drawn.any()):
            picks = torch.tensor([rng.randrange(pairs.count) for _ in range(int(drawn.sum()))])
            where = drawn.to(device)
            eps[where], x0[where] = pairs.noise[resolution][picks], pairs.samples[resolution][picks]
            text[where] = pairs.context[picks]
        sigma = (t / options.num_train_timesteps).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * eps
        context = latents[:, :, list(example.context)]
        if rng.random() < CONTEXT_NOISE_SHARE:  # the sampler's context is its own imperfect x0
            noise = torch.randn(context.shape, generator=generator).to(device)
            context = context + CONTEXT_NOISE * noise
        x = torch.cat([context, noisy], dim=2)
        frame_t = torch.zeros(size, x.shape[2], device=device)
        frame_t[:, len(example.context) :] = t[:, None]
        flow = model.forward_full(
            x,
            frame_t,
            text,
            rope=ropes[resolution],
            frame_positions=example.positions,
            frame_mask=example.mask,
        )
        loss = (flow[:, :, len(example.context) :] - (eps - x0)).pow(2).mean()
        optimiser.step(loss, progress)
    return model.eval().requires_grad_(False), optimiser.losses
