"""`python -m training.strip VIDEO.mp4 OUT.png`: a strip of evenly spaced frames of a video, with
each frame's time under it (the README's picture of what `make run` writes)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import av
import numpy as np
from PIL import Image, ImageDraw


def read_frames(path: str) -> tuple[list[np.ndarray], float]:
    """Every frame of a video as RGB arrays (H, W, 3), and its frame rate."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 16)
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], rate


def frame_strip(
    frames: Sequence[np.ndarray], rate: float, count: int = 6, scale: int = 1
) -> Image.Image:
    """`count` evenly spaced frames side by side, `scale`x, each captioned with its time."""
    if count < 1 or len(frames) < 1:
        raise ValueError(
            f"need count >= 1 and at least one frame (count={count}, frames={len(frames)})"
        )
    picks = [round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(count)]
    h, w = frames[0].shape[:2]
    gap, caption = 4, 16
    strip = Image.new("RGB", (count * (w * scale + gap) - gap, h * scale + caption), "white")
    draw = ImageDraw.Draw(strip)
    for i, index in enumerate(picks):
        image = Image.fromarray(frames[index]).resize((w * scale, h * scale), Image.NEAREST)
        x = i * (w * scale + gap)
        strip.paste(image, (x, 0))
        draw.text((x + 2, h * scale + 2), f"{index / rate:.1f} s", fill="black")
    return strip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.strip", description=__doc__)
    p.add_argument("video")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--scale", type=int, default=1)
    args = p.parse_args(argv)
    frames, rate = read_frames(args.video)
    frame_strip(frames, rate, args.count, args.scale).save(args.out)
    print(f"wrote {args.out} ({args.count} of {len(frames)} frames)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
