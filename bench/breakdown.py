"""Where the time goes per chunk: each step function timed on its own, VAE decode and encode.

A whole video is generated with the public step functions (as the distributed stages call them),
its latents decoded by the streaming VAE and encoded to fragmented MP4 (H.264) chunk by chunk.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.latency import Log, load
from bench.report import table
from histream_model.config import VideoShape, get_mode
from histream_model.flops import video_flops
from histream_model.generator import (
    commit_high,
    commit_low,
    downsample,
    high_steps,
    low_steps,
    new_resolution_state,
    plan_chunk,
    upsample,
)
from services.media import FragmentedMp4Encoder

MODES = ("histream", "histream+")
STEPS = ("low_steps", "upsample", "high_steps", "commit_high", "commit_low", "vae_decode", "encode")
DIT_STEPS = {  # step -> the (resolution, kind) of the FLOP model it runs
    "low_steps": ("low", "denoise"),
    "high_steps": ("high", "denoise"),
    "commit_high": ("high", "commit"),
    "commit_low": ("low", "commit"),
}


def run_video(components, context, mode: str, num_frames: int) -> dict[str, float]:
    """Seconds per step, summed over the chunks of one video."""
    preset, model, vae = components.preset, components.dit, components.vae
    options, seed = preset.options, 0
    shape = VideoShape(preset, get_mode(mode), preset.height, preset.width, num_frames)
    low = new_resolution_state(model, shape, "low", context)
    high = new_resolution_state(model, shape, "high", context)
    vae_state = vae.new_decode_state()
    encoder = FragmentedMp4Encoder(width=shape.width, height=shape.height)
    seconds = dict.fromkeys(STEPS, 0.0)

    @contextmanager
    def timed(step: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        seconds[step] += time.perf_counter() - started

    with encoder:
        for i in range(shape.num_chunks):
            plan = plan_chunk(shape, i)
            with timed("low_steps"):
                x0_low = low_steps(model, low, plan, options, seed)
            with timed("upsample"):
                x = upsample(x0_low, plan, high.latent_hw, options, seed)
            with timed("high_steps"):
                x0 = high_steps(model, high, plan, options, seed, x)
            with timed("commit_high"):
                commit_high(model, high, plan, x0)
            with timed("commit_low"):
                commit_low(model, low, plan, downsample(x0, low.latent_hw))
            with timed("vae_decode"):
                frames, vae_state = vae.decode_chunk(x0, vae_state)
            with timed("encode"):
                encoder.encode_segment(frames[0].transpose(0, 1))
    return seconds


def section(
    preset_name: str = "bench", repeats: int = 1, num_frames: int = 81, log: Log | None = None
) -> str:
    components, context = load(preset_name)
    preset = components.preset
    run_video(components, context, MODES[0], 9)  # warm-up
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for repeat in range(repeats):
        for mode in MODES:
            samples[mode].append(run_video(components, context, mode, num_frames))
            if log:
                total = sum(samples[mode][-1].values())
                log(f"  breakdown repeat {repeat + 1}/{repeats} {mode}: {total:.1f} s")
    med = {m: {s: statistics.median(r[s] for r in samples[m]) for s in STEPS} for m in MODES}
    model = {m: video_flops(preset, m, preset.height, preset.width, num_frames) for m in MODES}
    rows = []
    for step in STEPS:
        row: list[object] = [f"`{step}`"]
        for mode in MODES:
            total = sum(med[mode].values())
            denoise = sum(med[mode][s] for s in DIT_STEPS) + med[mode]["upsample"]
            row += [f"{med[mode][step]:.2f}", f"{med[mode][step] / total:.1%}"]
            if step in DIT_STEPS:
                flops = model[mode].by_kind()[DIT_STEPS[step]]
                row += [f"{med[mode][step] / denoise:.1%}", f"{flops / model[mode].total:.1%}"]
            else:
                row += [f"{med[mode][step] / denoise:.1%}" if step == "upsample" else "", ""]
        rows.append(row)
    headers = ["step"]
    for mode in MODES:
        headers += [f"`{mode}` s/video", "share", "share of denoising", "model FLOP share"]
    vae_share = ", ".join(f"`{m}` {med[m]['vae_decode'] / sum(med[m].values()):.0%}" for m in MODES)
    return (
        f"**{preset_name}** preset ({preset.width}x{preset.height}, {num_frames} frames, "
        f"{repeats} repeat(s), median), each step function timed on its own; VAE decode is the "
        f"preset's streaming Wan VAE (base dim {preset.vae.base_dim}), encode is H.264 fragmented "
        "MP4 (libx264 veryfast, zerolatency).\n\n"
        + table(headers, rows)
        + f"\n\nVAE decode share of the whole chunk pipeline: {vae_share}."
    )
