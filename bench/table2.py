"""Table 2 analogue: per-frame denoising latency of every mode, measured, modelled and reported.

All six modes run in one process, interleaved over repeats; each speedup is the median
self-forcing latency over the mode's median. Beside it: the speedup the FLOP model predicts for
the same preset and size, and the paper's measured ratio (1.3B, 1920x1088, A100).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench import latency
from bench.report import table
from histream_model.config import get_preset
from histream_model.flops import video_flops

BASELINE = "self-forcing"
# Table 1/2 rows (1.3B, 81 frames, 1920x1088, one A100): per-frame denoising latency in seconds.
PAPER_A100 = {
    "self-forcing": ("Self Forcing", 1.18),
    "no-drc": ("w/o DRC", 0.70),
    "no-agsw": ("w/o AGSW", 0.78),
    "histream": ("HiStream", 0.48),
    "naive-2step": ("Naive Two Steps", 0.32),
    "histream+": ("HiStream+", 0.34),
}
PAPER_H100 = {"histream+": 0.21}  # section 4.2: HiStream+ on one H100
# The other seeds' schedules on the same model (no row in HiStream's tables)
OTHER_SEEDS = {
    "diagonal": "Diagonal 5,4,3,2",
    "histream-diagonal": "HiStream+ w/ Diagonal context",
    "hiar": "HiAR",
    "histream-hiar": "HiAR w/ DRC",
}
MODES = [*PAPER_A100, *OTHER_SEEDS]


def paper_row(mode: str) -> tuple[str, float | None]:
    """The mode's name in the papers and HiStream's measured A100 s/frame (None: no row)."""
    if mode in PAPER_A100:
        return PAPER_A100[mode]
    return OTHER_SEEDS[mode], None


def kernel_rates(heads: int, head_dim: int, query_tokens: int, key_tokens: int) -> dict[str, float]:
    """This machine's FLOP/s on a large fp32 GEMM and on one self-attention call (best of 5)."""

    def best(fn, flops: float) -> float:
        fn()
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        return flops / min(seconds)

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    q = torch.randn(1, heads, query_tokens, head_dim)
    k, v = torch.randn(2, 1, heads, key_tokens, head_dim)
    attention_flops = 4 * query_tokens * key_tokens * heads * head_dim
    return {
        "gemm": best(lambda: a @ b, 2 * n**3),
        "attention": best(lambda: F.scaled_dot_product_attention(q, k, v), attention_flops),
    }


def section(
    preset_name: str = "bench",
    repeats: int = 3,
    num_frames: int = 81,
    log: latency.Log | None = None,
) -> str:
    preset = get_preset(preset_name)
    samples = latency.measure(preset_name, MODES, repeats, num_frames, log)
    model = {m: video_flops(preset, m, preset.height, preset.width, num_frames) for m in MODES}
    base = latency.median(samples[BASELINE])
    base_flops = model[BASELINE].total
    paper_base = PAPER_A100[BASELINE][1]
    dit, m = preset.dit, preset.options.chunk_frames
    shape = model[BASELINE].shape
    tokens = m * shape.tokens_per_frame(shape.high_latent_hw)
    rates = kernel_rates(dit.num_heads, dit.head_dim, tokens, 2 * tokens)
    rows = []
    for mode in MODES:
        med = latency.median(samples[mode])
        measured, predicted = base / med, base_flops / model[mode].total
        name, paper = paper_row(mode)
        rows.append(
            [
                f"`{mode}` ({name})",
                f"{med:.4f}",
                f"{min(samples[mode]):.4f}-{max(samples[mode]):.4f}",
                f"{model[mode].per_frame / 1e9:.3g}",
                f"{model[mode].per_frame / med / 1e9:.0f} "
                f"({model[mode].per_frame / med / rates['gemm']:.0%})",
                f"{measured:.2f}x",
                f"{predicted:.2f}x",
                f"{measured / predicted:.2f}",
                f"{paper:.2f}" if paper else "",
                f"{paper_base / paper:.2f}x" if paper else "",
            ]
        )
    headers = [
        "mode (paper row)",
        "median s/frame",
        "min-max",
        "model GFLOP/frame",
        "achieved GFLOP/s (of GEMM rate)",
        "measured speedup",
        "FLOP-model speedup",
        "measured / model",
        "paper s/frame (A100)",
        "paper speedup",
    ]
    h100 = PAPER_H100["histream+"]
    return (
        f"**{preset_name}** preset ({preset.width}x{preset.height}, "
        f"{preset.vae.latent_frames(num_frames)} latent frames = {num_frames} frames, "
        f"dim {dit.dim}, {dit.num_layers} layers), {repeats} repeats in one process, the "
        f"{len(MODES)} modes' sessions advancing chunk by chunk in turn; speedups are over the "
        "median self-forcing latency. This machine's rates: fp32 GEMM (2048^3) "
        f"{rates['gemm'] / 1e9:.0f} GFLOP/s, one high-res self-attention call ({dit.num_heads} "
        f"heads x {dit.head_dim}, {tokens} queries x {2 * tokens} keys) "
        f"{rates['attention'] / 1e9:.0f} GFLOP/s.\n\n"
        + table(headers, rows)
        + f"\n\nPaper, HiStream+ on one H100: {h100:.2f} s/frame "
        f"({paper_base / h100:.1f}x the A100 Self Forcing row)."
    )
