"""Per-frame denoising latency per mode, modes interleaved over repeats (median).

Per-frame latency = the video's denoising time (all chunks' steps and cache commits, no VAE)
divided by its frame count, as in the paper's tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from histream_model.components import load_components
from histream_model.config import get_preset
from histream_model.generator import HiStreamGenerator


def denoise_seconds(generator: HiStreamGenerator, context: torch.Tensor, num_frames: int) -> float:
    preset = generator.preset
    chunks = list(generator.generate(context, preset.height, preset.width, num_frames, seed=0))
    return sum(c.seconds for c in chunks)


def measure(
    preset_name: str, modes: Sequence[str], repeats: int, num_frames: int | None = None
) -> dict[str, list[float]]:
    """Seconds per frame for each mode, one sample per repeat, modes interleaved."""
    components = load_components(preset_name, device="cpu")
    preset = get_preset(preset_name)
    frames = num_frames or preset.num_frames
    context = components.text.encode(["a red fox running through fresh snow"])
    generators = {m: HiStreamGenerator(components.dit, components.preset, m) for m in modes}
    for generator in generators.values():  # warm-up: first-call allocations and kernel choice
        generator.generate(context, preset.height, preset.width, frames).__next__()
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, generator in generators.items():
            samples[mode].append(denoise_seconds(generator, context, frames) / frames)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
