"""A frame strip: a PNG of a few generated videos, one row per prompt, frames left to right.

`python -m training.strip --out histream_model/checkpoints/toy/strip.png` (defaults: the toy
preset's shipped weights, the first 4 evaluation scenes, `histream` mode, seed 0, 81 frames).
The README shows it so a reader sees what the embedded default makes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from histream_model.components import load_components, resolve_weights
from histream_model.config import MODES
from training.evaluate import SCENES, generate

LABEL_H = 14  # pixels of the prompt line above each row


def to_image(frame: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image."""
    pixels = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")


def strip(
    rows: Sequence[tuple[str, torch.Tensor]], picks: Sequence[int], gap: int = 2
) -> Image.Image:
    """(prompt, frames (F, 3, H, W)) rows -> one image: each row its prompt, then the frames
    at `picks`, labelled with their index."""
    h, w = rows[0][1].shape[-2:]
    width = len(picks) * (w + gap) - gap
    out = Image.new("RGB", (width, len(rows) * (LABEL_H + h + gap)), "white")
    draw = ImageDraw.Draw(out)
    for r, (prompt, frames) in enumerate(rows):
        top = r * (LABEL_H + h + gap)
        draw.text((2, top + 1), prompt, fill="black")
        for c, index in enumerate(picks):
            left = c * (w + gap)
            out.paste(to_image(frames[index]), (left, top + LABEL_H))
            draw.text((left + 2, top + LABEL_H + 2), f"{index}", fill="white")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.strip", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--weights", type=Path, help="a trained folder (default: the shipped ones)")
    p.add_argument("--mode", default="histream", choices=sorted(MODES))
    p.add_argument("--scenes", type=int, default=4, help=f"the first N of {len(SCENES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=81, help="1 + 4k frames per video")
    args = p.parse_args(argv)
    weights = resolve_weights(args.weights) if args.weights else None
    components = load_components("toy", device="cpu", weights=weights)
    rows = []
    for scene in SCENES[: args.scenes]:
        frames, _ = generate(components, args.mode, scene.prompt, args.seed, args.frames)
        rows.append((scene.prompt, frames))
    last = args.frames - 1
    picks = sorted({0, last // 4, last // 2, 3 * last // 4, last})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip(rows, picks).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
