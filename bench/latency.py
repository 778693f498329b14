"""Per-frame denoising latency per mode, modes interleaved chunk by chunk over repeats (median).

Per-frame latency = the video's denoising time (all chunks' steps and cache commits, no VAE)
divided by its frame count, as in the paper's tables.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from histream_model.components import Components, load_components
from histream_model.config import Preset
from histream_model.dit import WanDiT
from histream_model.generator import HiStreamGenerator

PROMPT = "a red fox running through fresh snow"

Log = Callable[[str], None]


def load(preset_name: str) -> tuple[Components, torch.Tensor]:
    """The preset's random-weight models on the CPU and the benchmark prompt's text context."""
    components = load_components(preset_name, device="cpu")
    return components, components.text.encode([PROMPT])


def measure(
    preset_name: str,
    modes: Sequence[str],
    repeats: int,
    num_frames: int | None = None,
    log: Log | None = None,
) -> dict[str, list[float]]:
    """Seconds per frame for each mode, one sample per repeat.

    Within a repeat every mode runs a session of its own and the sessions advance chunk by chunk
    in turn (mode 1 chunk 1, mode 2 chunk 1, ..., mode 1 chunk 2, ...), so a slow spell of the
    machine lands on every mode alike instead of on whichever video was running.
    """
    components, context = load(preset_name)
    return measure_model(
        components.dit, components.preset, context, modes, repeats, num_frames, log
    )


def measure_model(
    dit: WanDiT,
    preset: Preset,
    context: torch.Tensor,
    modes: Sequence[str],
    repeats: int,
    num_frames: int | None = None,
    log: Log | None = None,
    interleave: bool = True,
) -> dict[str, list[float]]:
    """`measure` with a model already built (on any device) and its text context. Without
    `interleave`, each mode's session runs whole before the next starts (and is freed), so only
    one session's caches are held at a time: on a GPU every session of a 1080p video at once
    does not fit."""
    preset_name = preset.name
    frames = num_frames or preset.num_frames
    generators = {m: HiStreamGenerator(dit, preset, m) for m in modes}
    for generator in generators.values():  # warm-up: first-call allocations and kernel choice
        generator.step(generator.start(context, preset.height, preset.width, frames))
        if dit.patch_embedding.weight.is_cuda:
            torch.cuda.empty_cache()
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(repeats):
        started = time.perf_counter()
        seconds = dict.fromkeys(modes, 0.0)
        groups = [list(modes)] if interleave else [[m] for m in modes]
        for group in groups:
            states = {
                m: generators[m].start(context, preset.height, preset.width, frames, seed=0)
                for m in group
            }
            while not all(state.done for state in states.values()):
                for mode in group:
                    if not states[mode].done:
                        seconds[mode] += generators[mode].step(states[mode]).seconds
            del states
        for mode in modes:
            samples[mode].append(seconds[mode] / frames)
        if log:
            took = time.perf_counter() - started
            per_mode = ", ".join(f"{m} {seconds[m] / frames:.4f}" for m in modes)
            log(
                f"  {preset_name} repeat {repeat + 1}/{repeats} ({took:.0f} s), s/frame: {per_mode}"
            )
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
