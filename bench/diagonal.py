"""What writes KV_low in `histream-diagonal`: a t = 0 commit pass on Down(x0) (the default) or the
low-res denoising pass's own keys (`diagonal_low_context="last-pass"`): per-frame latency of
both, interleaved chunk by chunk, beside the FLOP model's figures.
"""

from __future__ import annotations

import statistics

from bench import latency
from bench.report import table
from histream_model.config import get_preset, with_options
from histream_model.flops import video_flops
from histream_model.generator import HiStreamGenerator

VARIANTS = ("commit", "last-pass")


def section(preset_name: str, frames: int, repeats: int, log=None) -> str:
    components, context = latency.load(preset_name)
    presets = {v: with_options(components.preset, diagonal_low_context=v) for v in VARIANTS}
    gens = {
        v: HiStreamGenerator(components.dit, p, "histream-diagonal") for v, p in presets.items()
    }
    h, w = components.preset.height, components.preset.width
    for gen in gens.values():  # warm-up
        gen.step(gen.start(context, h, w, frames))
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(repeats):
        states = {v: g.start(context, h, w, frames) for v, g in gens.items()}
        seconds = dict.fromkeys(VARIANTS, 0.0)
        while not all(s.done for s in states.values()):
            for v, gen in gens.items():
                if not states[v].done:
                    seconds[v] += gen.step(states[v]).seconds
        for v in VARIANTS:
            samples[v].append(seconds[v] / frames)
        if log:
            log(f"  diagonal-context repeat {repeat + 1}/{repeats}")
    rows = []
    base = statistics.median(samples["commit"])
    for v in VARIANTS:
        med = statistics.median(samples[v])
        model = video_flops(presets[v], "histream-diagonal", h, w, frames).per_frame
        flops_1080 = video_flops(
            with_options(get_preset("wan2.1-1.3b"), diagonal_low_context=v),
            "histream-diagonal", 1088, 1920, 81,
        ).per_frame  # fmt: skip
        rows.append([f"`{v}`", f"{med:.4f}", f"{base / med:.2f}x", f"{model / 1e9:.2f}",
                     f"{flops_1080 / 1e12:.1f}"])  # fmt: skip
    headers = ["KV_low of chunks 2..", "median s/frame", "speed vs commit",
               "model GFLOP/frame", "model TFLOP/frame at 1080p"]  # fmt: skip
    return (
        f"**{preset_name}** preset, `histream-diagonal`, {frames} frames, {repeats} repeats "
        "interleaved; medians.\n\n" + table(headers, rows)
    )
