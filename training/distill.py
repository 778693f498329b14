"""Distilling the first chunk's draw: noise -> sample pairs from a teacher's many-step solve.

A few-step sampler commits to a scene at its first level, from pure noise, in one prediction.
Trained by flow matching alone, that prediction is the mean of every scene the prompt allows (a
background with the object smeared over all places), and the later steps only refine it. A
distilled model (Self-Forcing's DMD; Luhman & Luhman's noise -> sample regression; rectified
flow's reflow) learns instead a map from each noise to one sample. Here: a teacher trained at
every noise level (`train_dit(continuous=True)`) solves the flow ODE from pure noise in many
Euler steps for first chunks of the training prompts, at both resolutions (`ode_pairs`); the
student then learns those (noise, sample) pairs at the top level of first chunks
(`train_dit(pairs=...)`), and flow matching on the clips everywhere else.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from histream_model.config import Preset, Resolution
from histream_model.dit import WanDiT
from histream_model.rope import RopeAxes
from training.dit import LatentClips

# The student starts from the teacher: a lower peak learning rate than from scratch.
STUDENT_LR = 5e-4


@dataclass
class Pairs:
    """First chunks drawn by a teacher: its noise and sample per resolution, and the prompt."""

    noise: dict[Resolution, Tensor]  # (N, z, chunk_frames, h, w)
    samples: dict[Resolution, Tensor]
    context: Tensor  # (N, text_len, text_dim)

    @property
    def count(self) -> int:
        return self.context.shape[0]


def solve_levels(shift: float, steps: int) -> list[float]:
    """Noise levels from 1 to 0 in `steps` Euler steps, uniform before the shift's warp."""
    us = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * u / (1 + (shift - 1) * u) for u in us]


@torch.no_grad()
def ode_pairs(
    teacher: WanDiT,
    preset: Preset,
    clips: LatentClips,
    count: int,
    steps: int,
    seed: int,
    batch: int = 128,
    progress: Callable[[int], None] | None = None,
    guidance: float = 1.0,
) -> Pairs:
    """`count` first chunks per resolution, each the teacher's Euler solve (`steps` steps) of the
    flow ODE from pure noise under a random training clip's prompt; with `guidance` g > 1 the
    flow is classifier-free guided, unconditional + g (conditional - unconditional), the empty
    prompt being the all-zero context (a teacher trained with `prompt_dropout`)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    device = clips.context.device
    options = preset.options
    index = torch.tensor([rng.randrange(clips.context.shape[0]) for _ in range(count)])
    context = clips.context[index.to(device)]
    sigmas = solve_levels(options.shift, steps)
    noise, samples = {}, {}
    for resolution in Resolution:
        rope = RopeAxes.build(preset.dit, options.at(resolution).ntk_factors)
        _, z, _, h, w = clips.latents[resolution].shape
        eps = torch.randn((count, z, options.chunk_frames, h, w), generator=generator)
        eps = eps.to(device)
        out = []
        for first in range(0, count, batch):
            x = eps[first : first + batch].clone()
            text = context[first : first + batch]
            for s, s_next in pairwise(sigmas):
                t = torch.full((x.shape[0],), s * options.num_train_timesteps, device=device)
                x = x + (s_next - s) * _flow(teacher, x, t, text, rope, guidance)
            out.append(x)
            if progress is not None:
                progress(x.shape[0])
        noise[resolution], samples[resolution] = eps, torch.cat(out)
    return Pairs(noise=noise, samples=samples, context=context)


def _flow(teacher: WanDiT, x: Tensor, t: Tensor, text: Tensor, rope, guidance: float) -> Tensor:
    if guidance == 1.0:
        return teacher.forward_full(x, t, text, rope=rope)
    both = teacher.forward_full(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, torch.zeros_like(text)]), rope=rope
    )
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)
