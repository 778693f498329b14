"""The FLOP model at the paper's size: Wan2.1-1.3B, 1920x1088, 81 frames, and the latency floor.

The floor is the modelled FLOPs at a GPU's dense bf16 peak: no kernel reaches it, so the
paper's measured latency over the floor is the utilisation its implementation implies.
"""

from __future__ import annotations

from bench.report import table
from bench.table2 import BASELINE, MODES, PAPER_A100, PAPER_H100, paper_row
from histream_model.config import get_preset, with_options
from histream_model.flops import video_flops, worker_bytes

PRESET, HEIGHT, WIDTH, FRAMES = "wan2.1-1.3b", 1088, 1920, 81
PEAK_H100 = 989e12  # H100 SXM dense bf16 FLOP/s
PEAK_A100 = 312e12  # A100 dense bf16 FLOP/s


def section() -> str:
    preset = get_preset(PRESET)
    model = {m: video_flops(preset, m, HEIGHT, WIDTH, FRAMES) for m in MODES}
    base = model[BASELINE].total
    rows = []
    for mode in MODES:
        v = model[mode]
        terms, kinds = v.by_term(), v.by_kind()
        low = sum(f for (res, _), f in kinds.items() if res == "low")
        commit = sum(f for (_, kind), f in kinds.items() if kind == "commit")
        name, paper = paper_row(mode)
        floor_a100, floor_h100 = v.per_frame / PEAK_A100, v.per_frame / PEAK_H100
        h100 = PAPER_H100.get(mode)
        rows.append(
            [
                f"`{mode}` ({name})",
                f"{v.per_frame / 1e12:.1f}",
                f"{terms['self_attn'] / v.total:.0%}",
                f"{low / v.total:.0%}",
                f"{commit / v.total:.0%}",
                f"{base / v.total:.2f}x",
                f"{PAPER_A100[BASELINE][1] / paper:.2f}x" if paper else "",
                f"{floor_h100:.3f}",
                f"{floor_a100:.3f}",
                f"{paper:.2f} ({floor_a100 / paper:.0%})" if paper else "",
                f"{h100:.2f} ({floor_h100 / h100:.0%})" if h100 else "",
            ]
        )
    headers = [
        "mode (paper row)",
        "TFLOP/frame",
        "self-attention share",
        "low-res share",
        "commit share",
        "model speedup",
        "paper speedup",
        "floor s/frame H100",
        "floor s/frame A100",
        "paper A100 s/frame (floor/paper)",
        "paper H100 s/frame (floor/paper)",
    ]
    hp = model["histream+"]
    last = with_options(preset, diagonal_low_context="last-pass")
    last_pass = video_flops(last, "histream-diagonal", HEIGHT, WIDTH, FRAMES).per_frame
    commit = model["histream-diagonal"].per_frame
    per_worker = worker_bytes(preset, "hiar", HEIGHT, WIDTH, FRAMES, 4, 2)
    hybrid = worker_bytes(preset, "histream-hiar", HEIGHT, WIDTH, FRAMES, 4, 2)
    text_tflop = hp.text_kv / 1e12
    return (
        f"Model only (no measurement): {PRESET} (dim {preset.dit.dim}, {preset.dit.num_layers} "
        f"layers), {WIDTH}x{HEIGHT}, {FRAMES} frames = {hp.shape.latent_frames} latent frames in "
        f"{hp.shape.num_chunks} chunks; {hp.shape.tokens_per_frame(hp.shape.high_latent_hw)} "
        f"high-res / {hp.shape.tokens_per_frame(hp.shape.low_latent_hw)} low-res tokens per "
        f"latent frame. Floors at dense bf16 peak: H100 {PEAK_H100 / 1e12:.0f} TFLOP/s, A100 "
        f"{PEAK_A100 / 1e12:.0f} TFLOP/s. Shares are of the mode's FLOPs.\n\n"
        + table(headers, rows)
        + f"\n\nText K/V, once per prompt (both resolutions): {text_tflop:.3f} TFLOP, "
        "outside the per-frame figures.\n\n`histream-diagonal` writes KV_low of chunks 2.. with "
        f"a t = 0 pass on Down(x0) ({commit / 1e12:.1f} TFLOP/frame); taking the low-res "
        f'denoising pass\'s keys instead (`diagonal_low_context="last-pass"`) would be '
        f"{last_pass / 1e12:.1f} TFLOP/frame, {1 - last_pass / commit:.1%} less, but with one "
        "low step that pass reads pure noise (t = 1000), so its keys carry nothing of the chunk."
        f"\n\nHiAR's pipeline on 4 step workers, bf16: a `hiar` session holds "
        f"{per_worker[0] / 1e9:.2f} GB on each worker (its step's sliding-window KV_high and a "
        f"text K/V), {sum(per_worker) / 1e9:.1f} GB in all; `histream-hiar` "
        f"{', '.join(f'{b / 1e9:.2f}' for b in hybrid)} GB (two low-res, two high-res steps)."
    )
