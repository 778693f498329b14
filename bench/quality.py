"""Quality and speed of every mode on the trained `toy` preset (the paper's Table 1 form).

Prompt adherence per attribute read from the pixels (`training.scoring`), background flicker,
drift over 30-second videos, PSNR/SSIM against the `self-forcing` video of the same prompt and
seed, and denoising seconds per frame on this CPU. `training.evaluate` generates and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.report import table
from histream_model.components import load_components, resolve_weights
from histream_model.config import MODES
from training.evaluate import LONG_SCENES, REFERENCE_MODE, SCENES, drift, evaluate, summary
from training.scoring import ATTRIBUTES


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def section(
    frames: int,
    seeds: list[int],
    scenes: int,
    drift_seconds: int,
    weights: str | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    paths = resolve_weights(weights) if weights else None  # None: the shipped weights
    components = load_components("toy", paths, device="cpu")
    modes = list(MODES)
    scores = evaluate(components, modes, SCENES[:scenes], seeds, frames, log)
    drifts = drift(components, modes, LONG_SCENES, drift_seconds, log=log) if drift_seconds else []
    rows = []
    for mode, row in summary(scores, drifts).items():
        late = [_fmt(row.get("colour_30s"), 0), _fmt(row.get("shape_30s"), 0),
                _fmt(row.get("colour_shift_30s"))]  # fmt: skip
        rows.append(
            [f"`{mode}`"]
            + [_fmt(row[a], 0) for a in ATTRIBUTES]
            + [
                _fmt(row["flicker"], 2),
                *late,
                _fmt(row["psnr"]),
                _fmt(row["ssim"], 3),
                f"{row['seconds_per_frame']:.4f}",
            ]
        )
    headers = [f"{a} %" for a in ATTRIBUTES] + [
        "flicker",
        f"colour % at {drift_seconds} s",
        f"shape % at {drift_seconds} s",
        "colour shift",
        f"PSNR vs {REFERENCE_MODE}",
        "SSIM",
        "s/frame",
    ]
    videos = len(SCENES[:scenes]) * len(seeds)
    return (
        f"`toy` preset (trained weights), {videos} one-object prompts x {len(modes)} modes, "
        f"{frames} frames at {components.preset.width}x{components.preset.height}; drift: "
        f"{len(LONG_SCENES)} prompts at {drift_seconds} s. Adherence: % of videos whose pixels "
        "show the asked attribute; flicker: mean frame-to-frame change of background pixels "
        "(0-255); colour shift: RGB distance of the object's colour, first vs last 2 s; s/frame: "
        "denoising on this CPU, median.\n\n" + table(["mode", *headers], rows)
    )
