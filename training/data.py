"""Procedural training videos: simple scenes from a prompt grammar, with their ground truth.

A scene is one or two flat-coloured shapes on a flat background. Each object has a colour, a
shape, a size and a motion; the prompt says all of it ("a large red circle moving slowly left on a
dark blue background"). Objects wrap around the frame edges (a torus), so a motion holds for any
length of video; "bouncing" goes up and down between the top and bottom edges.

Everything is a pure function of (seed, size, frames): `sample_scene(seed)` draws a scene and
`render(scene, height, width, frames)` draws its frames at any resolution (sizes and speeds are
fractions of the frame, so the low-res and high-res renders show the same video). The ground truth
(`Scene.centres`) is what the quality evaluator scores generated videos against. No camera pans:
on flat backgrounds a pan is invisible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

FPS = 16

# Object colours (RGB 0-255) and background colours; names are the prompt's words.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "dark blue": (20, 30, 95),
    "dark green": (20, 75, 35),
    "gray": (125, 125, 125),
    "dark red": (95, 20, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.11, "large": 0.19}  # radius as a fraction of the height
SPEEDS: dict[str, float] = {"slowly": 0.008, "quickly": 0.02}  # fraction of the height per frame
# Unit direction (dx, dy) per motion word, image axes (y grows downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up and left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up and right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down and left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down and right": (math.sqrt(0.5), math.sqrt(0.5)),
}
MOTIONS = (*DIRECTIONS, "still", "bouncing")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    motion: str  # a DIRECTIONS key, "still" or "bouncing"
    speed: str  # a SPEEDS key (ignored when still)
    x0: float  # start centre, fractions of width / height
    y0: float

    def phrase(self) -> str:
        if self.motion == "still":
            movement = "standing still"
        elif self.motion == "bouncing":
            movement = f"bouncing {self.speed}"
        else:
            movement = f"moving {self.speed} {self.motion}"
        return f"a {self.size} {self.colour} {self.shape} {movement}"

    def velocity(self, height: int) -> tuple[float, float]:
        """Pixels per frame (dx, dy) at a frame height (bouncing: the upward-start speed)."""
        if self.motion == "still":
            return 0.0, 0.0
        speed = SPEEDS[self.speed] * height
        if self.motion == "bouncing":
            return 0.0, speed
        dx, dy = DIRECTIONS[self.motion]
        return dx * speed, dy * speed

    def centre(self, frame: int, height: int, width: int) -> tuple[float, float]:
        """Centre (x, y) in pixels at `frame` (x and y wrapped into the frame)."""
        radius = SIZES[self.size] * height
        vx, vy = self.velocity(height)
        x = (self.x0 * width + vx * frame) % width
        if self.motion == "bouncing":
            low, high = radius, height - radius
            span = high - low
            phase = (self.y0 * height - low + vy * frame) % (2 * span)
            return x, low + (phase if phase <= span else 2 * span - phase)
        return x, (self.y0 * height + vy * frame) % height


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str

    @property
    def prompt(self) -> str:
        things = " and ".join(o.phrase() for o in self.objects)
        return f"{things} on a {self.background} background"

    def centres(self, frames: int, height: int, width: int) -> torch.Tensor:
        """Ground-truth centres [frames, objects, 2] (x, y) in pixels."""
        return torch.tensor(
            [[o.centre(f, height, width) for o in self.objects] for f in range(frames)]
        )


# Where the objects of a `placed` scene start (fractions of width, height), by object count.
PLACES = {1: ((0.5, 0.5),), 2: ((1 / 3, 0.5), (2 / 3, 0.5))}


def sample_scene(seed: int, two_objects: float = 0.25, placed: bool = False) -> Scene:
    """A random scene; with probability `two_objects` a second object of another colour.

    `placed`: the objects start at fixed places (`PLACES`: the centre; or the left and right
    thirds, in the prompt's order), so the prompt alone decides the whole video up to where it
    sits. The DiT is trained on placed scenes moved to a token of the frame
    (`training.dit.centre_on`): where the noise peaks, or anywhere. Other draws are the same
    either way.
    """
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    count = 2 if rng.random() < two_objects else 1
    colours = rng.sample(list(COLOURS), count)
    objects = tuple(
        SceneObject(
            colour=colour,
            shape=rng.choice(SHAPES),
            size=rng.choice(list(SIZES)),
            motion=rng.choice(MOTIONS),
            speed=rng.choice(list(SPEEDS)),
            x0=rng.random(),
            y0=rng.uniform(0.25, 0.75),
        )
        for colour in colours
    )
    if placed:
        objects = tuple(
            replace(o, x0=x, y0=y) for o, (x, y) in zip(objects, PLACES[count], strict=True)
        )
    return Scene(objects=objects, background=background)


def scene_from(
    colour: str,
    shape: str,
    motion: str,
    background: str,
    size: str = "large",
    speed: str = "quickly",
    x0: float = 0.5,
    y0: float = 0.5,
) -> Scene:
    """A one-object scene named attribute by attribute (the evaluator's prompts)."""
    for value, allowed, what in (
        (colour, COLOURS, "colour"),
        (shape, SHAPES, "shape"),
        (motion, MOTIONS, "motion"),
        (background, BACKGROUNDS, "background"),
        (size, SIZES, "size"),
        (speed, SPEEDS, "speed"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {list(allowed)}")
    obj = SceneObject(colour, shape, size, motion, speed, x0, y0)
    return Scene(objects=(obj,), background=background)


def _coverage(signed_distance: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return (0.5 - signed_distance).clamp(0.0, 1.0)


def _shape_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # An upward-pointing triangle inscribed in the circle of radius r.
    k = math.sqrt(3.0)
    edge_bottom = dy - 0.5 * r
    edge_left = (-k * dx - dy) / 2 - 0.5 * r
    edge_right = (k * dx - dy) / 2 - 0.5 * r
    return torch.maximum(edge_bottom, torch.maximum(edge_left, edge_right))


def render(scene: Scene, height: int, width: int, frames: int, start: int = 0) -> torch.Tensor:
    """Frames [frames, 3, height, width] in [-1, 1] for video frames start .. start + frames."""
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5  # (1, H, 1)
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5  # (1, 1, W)
    background = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32)
    image = background.view(1, 3, 1, 1).expand(frames, 3, height, width).clone()
    for obj in scene.objects:
        centres = torch.tensor([obj.centre(start + i, height, width) for i in range(frames)])
        cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]  # (F, 1, 1) each
        # Wrapped offsets, so an object crossing an edge shows on both sides.
        dx = torch.remainder(xs - cx + width / 2, width) - width / 2  # (F, 1, W)
        dy = torch.remainder(ys - cy + height / 2, height) - height / 2  # (F, H, 1)
        distance = _shape_distance(obj.shape, dx, dy, SIZES[obj.size] * height)  # (F, H, W)
        alpha = _coverage(distance)[:, None]  # (F, 1, H, W)
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32).view(1, 3, 1, 1)
        image = image * (1 - alpha) + colour * alpha
    return image / 127.5 - 1.0
