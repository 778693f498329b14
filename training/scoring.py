"""Reading a generated video's pixels back into the prompt grammar's attributes.

For one-object scenes on a flat background (`training.data`): the background is each frame's
median colour; the object is every pixel far from it. From the object pixels of each frame come
its colour (median, nearest named colour), its centre (a circular mean: objects wrap around the
edges), its shape (how much of its bounding box it fills: square ~1, circle ~0.79, triangle ~0.5)
and its size; from the centres over time its motion (direction of the mean velocity, still,
or bouncing when the vertical motion reverses) and speed. Nothing here knows the prompt: the
attributes are compared with the scene's ground truth by `adherence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from training.data import BACKGROUNDS, COLOURS, DIRECTIONS, SIZES, SPEEDS, Scene

OBJECT_DISTANCE = 60.0  # RGB distance (0-255) from the background that counts as object
MIN_PIXELS = 12  # fewer object pixels than this: no object in the frame
ATTRIBUTES = ("colour", "shape", "size", "motion", "speed", "background")


@dataclass(frozen=True)
class Reading:
    """What the pixels of one video say."""

    colour: str | None  # None when no frame shows an object
    shape: str | None
    size: str | None
    motion: str | None
    speed: str | None
    background: str
    object_rgb: tuple[float, float, float] | None  # median object colour
    velocity: tuple[float, float]  # mean pixels per frame (x, y)
    visible: float  # fraction of frames showing an object


def to_rgb(frames: Tensor) -> Tensor:
    """Frames (F, 3, H, W) in [-1, 1] -> float 0-255 (F, H, W, 3)."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)


def _nearest(rgb: Tensor, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    refs = torch.tensor([table[n] for n in names], dtype=torch.float32)
    return names[int((refs - rgb).norm(dim=1).argmin())]


def _circular_centre(weights: Tensor, axis: int) -> float:
    """Centre of mass along `axis` of a (H, W) mask on a torus, in pixels."""
    size = weights.shape[axis]
    profile = weights.sum(dim=1 - axis)  # (size,)
    angles = (torch.arange(size, dtype=torch.float32) + 0.5) * (2 * math.pi / size)
    s, c = (profile * angles.sin()).sum(), (profile * angles.cos()).sum()
    return float(torch.atan2(s, c) % (2 * math.pi)) * size / (2 * math.pi)


def _fill_and_area(mask: Tensor, cx: float, cy: float) -> tuple[float, float]:
    """(fraction of its bounding box the object fills, its area) with the object rolled to the
    middle so an edge crossing does not split it."""
    h, w = mask.shape
    rolled = torch.roll(mask, shifts=(h // 2 - int(cy), w // 2 - int(cx)), dims=(0, 1))
    rows, cols = rolled.any(dim=1).nonzero(), rolled.any(dim=0).nonzero()
    box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
    area = float(rolled.sum())
    return area / box, area


def _wrap(delta: Tensor, size: int) -> Tensor:
    return torch.remainder(delta + size / 2, size) - size / 2


def read_video(frames: Tensor) -> Reading:
    """The attributes of a one-object video: frames (F, 3, H, W) in [-1, 1]."""
    rgb = to_rgb(frames)  # (F, H, W, 3)
    n, h, w, _ = rgb.shape
    background_rgb = rgb.flatten(1, 2).median(dim=1).values  # (F, 3)
    far = (rgb - background_rgb[:, None, None]).norm(dim=-1) > OBJECT_DISTANCE  # (F, H, W)
    centres, fills, areas, colours = [], [], [], []
    for i in range(n):
        mask = far[i]
        if int(mask.sum()) < MIN_PIXELS:
            centres.append(None)
            continue
        cx, cy = _circular_centre(mask.float(), 1), _circular_centre(mask.float(), 0)
        fill, area = _fill_and_area(mask, cx, cy)
        centres.append((cx, cy))
        fills.append(fill)
        areas.append(area)
        colours.append(rgb[i][mask].median(dim=0).values)
    background = _nearest(background_rgb.median(dim=0).values, BACKGROUNDS)
    seen = [c for c in centres if c is not None]
    if not seen:
        return Reading(None, None, None, None, None, background, None, (0.0, 0.0), 0.0)
    object_rgb = torch.stack(colours).median(dim=0).values
    fill = sorted(fills)[len(fills) // 2]
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square"
    radius = math.sqrt(sorted(areas)[len(areas) // 2] / _AREA_PER_R2[shape])
    size = min(SIZES, key=lambda s: abs(SIZES[s] * h - radius))
    velocity, motion, speed = _motion(centres, h, w)
    return Reading(
        colour=_nearest(object_rgb, COLOURS),
        shape=shape,
        size=size,
        motion=motion,
        speed=speed,
        background=background,
        object_rgb=tuple(round(float(v), 1) for v in object_rgb),  # type: ignore[arg-type]
        velocity=velocity,
        visible=len(seen) / n,
    )


# Area / r^2 of each shape as `training.data` draws it (r: the size's radius).
_AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.85) ** 2, "triangle": 3 * math.sqrt(3) / 4}


def _motion(
    centres: list[tuple[float, float] | None], h: int, w: int
) -> tuple[tuple[float, float], str, str]:
    """Mean velocity, motion word and speed word from per-frame centres."""
    steps = [(a, b) for a, b in pairwise(centres) if a is not None and b is not None]
    if not steps:
        return (0.0, 0.0), "still", "slowly"
    deltas = torch.tensor([[b[0] - a[0], b[1] - a[1]] for a, b in steps])
    deltas[:, 0], deltas[:, 1] = _wrap(deltas[:, 0], w), _wrap(deltas[:, 1], h)
    vx, vy = (float(v) for v in deltas.mean(dim=0))
    pace = float(deltas.norm(dim=1).mean())  # mean speed, also for a motion that reverses
    threshold = math.sqrt(SPEEDS["slowly"] * SPEEDS["quickly"]) * h
    speed = "slowly" if pace < threshold else "quickly"
    if pace < 0.35 * SPEEDS["slowly"] * h:
        return (vx, vy), "still", speed
    dy = deltas[:, 1]
    moving = dy[dy.abs() > 0.3 * SPEEDS["slowly"] * h]
    reverses = len(moving) > 2 and bool((moving > 0).any() and (moving < 0).any())
    if reverses and abs(vx) < 0.35 * pace:
        sign_changes = int((moving[1:].sign() != moving[:-1].sign()).sum())
        if sign_changes <= max(2, len(moving) // 8):  # a few bounces, not jitter
            return (vx, vy), "bouncing", speed
    angle = math.atan2(vy, vx)
    motion = min(
        DIRECTIONS,
        key=lambda d: abs(_angle_diff(angle, math.atan2(DIRECTIONS[d][1], DIRECTIONS[d][0]))),
    )
    return (vx, vy), motion, speed


def _angle_diff(a: float, b: float) -> float:
    return (a - b + math.pi) % (2 * math.pi) - math.pi


def adherence(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Which of the prompt's attributes the video shows (one-object scenes)."""
    obj = scene.objects[0]
    wanted = {
        "colour": obj.colour,
        "shape": obj.shape,
        "size": obj.size,
        "motion": obj.motion,
        "speed": None if obj.motion == "still" else obj.speed,
        "background": scene.background,
    }
    return {
        name: value is None or getattr(reading, name) == value for name, value in wanted.items()
    }


def background_flicker(frames: Tensor) -> float:
    """Mean absolute frame-to-frame change (0-255) of pixels that are background in both frames:
    0 for a steady background; the temporal-consistency score."""
    rgb = to_rgb(frames)
    background_rgb = rgb.flatten(1, 2).median(dim=1).values
    near = (rgb - background_rgb[:, None, None]).norm(dim=-1) < OBJECT_DISTANCE / 2
    steady = near[1:] & near[:-1]  # (F-1, H, W)
    change = (rgb[1:] - rgb[:-1]).abs().mean(dim=-1)
    return float(change[steady].mean()) if steady.any() else float("nan")


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two videos (F, 3, H, W) in [-1, 1], on the 0-255 scale."""
    mse = float((to_rgb(a) - to_rgb(b)).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM (11-tap Gaussian window, sigma 1.5, per channel) of two videos in [-1, 1]."""
    x, y = (to_rgb(v).permute(0, 3, 1, 2) for v in (a, b))  # (F, 3, H, W), 0-255
    taps = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    taps = taps / taps.sum()
    window = (taps[:, None] * taps[None, :]).expand(3, 1, 11, 11).contiguous()

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())
