"""The procedural data: prompts from the grammar, frames that match their ground truth, and the
pixel reader that scores generated videos (checked here on the generator's own frames)."""

from __future__ import annotations

import random

import pytest
import torch

from training.data import (
    BACKGROUNDS,
    COLOURS,
    SIZES,
    render,
    sample_scene,
    scene_from,
)
from training.scoring import ATTRIBUTES, adherence, background_flicker, psnr, read_video, ssim


def _rgb(frames: torch.Tensor, f: int, x: float, y: float) -> tuple[int, ...]:
    pixel = frames[f, :, int(y), int(x)]
    return tuple(int(v) for v in ((pixel + 1) * 127.5).round())


def test_prompt_says_every_attribute() -> None:
    scene = scene_from("red", "circle", "left", "dark blue", size="small", speed="slowly")
    assert scene.prompt == "a small red circle moving slowly left on a dark blue background"
    still = scene_from("white", "square", "still", "black")
    assert still.prompt == "a large white square standing still on a black background"
    bounce = scene_from("cyan", "triangle", "bouncing", "gray")
    assert bounce.prompt == "a large cyan triangle bouncing quickly on a gray background"


def test_unknown_attribute_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown colour 'teal'.*'red'"):
        scene_from("teal", "circle", "left", "black")
    with pytest.raises(ValueError, match="unknown motion 'sideways'"):
        scene_from("red", "circle", "sideways", "black")


def test_scenes_are_seeded_and_varied() -> None:
    assert sample_scene(7) == sample_scene(7)
    scenes = [sample_scene(s) for s in range(200)]
    assert len({s.prompt for s in scenes}) > 190  # 9600 one-object prompts alone
    two = [s for s in scenes if len(s.objects) == 2]
    assert 20 < len(two) < 80  # about a quarter
    assert all(s.objects[0].colour != s.objects[1].colour for s in two)
    assert torch.equal(render(scenes[3], 64, 96, 5), render(scenes[3], 64, 96, 5))


@pytest.mark.parametrize("motion", ["left", "up and right", "bouncing", "still"])
def test_frames_show_the_ground_truth(motion: str) -> None:
    scene = scene_from("yellow", "square", motion, "dark green", x0=0.9, y0=0.4)
    h, w, n = 128, 192, 81
    frames = render(scene, h, w, n)
    assert frames.shape == (n, 3, h, w) and frames.min() >= -1 and frames.max() <= 1
    centres = scene.centres(n, h, w)[:, 0]  # (F, 2)
    for f in (0, 40, 80):
        x, y = centres[f].tolist()
        assert _rgb(frames, f, x, y) == COLOURS["yellow"]
        # a point a radius and a half away (wrapped) is background
        far_x = (x + 1.5 * SIZES["large"] * h) % w
        assert _rgb(frames, f, far_x, y) == BACKGROUNDS["dark green"]
    if motion == "left":  # 0.02 * 128 px per frame, wrapping at the left edge
        assert centres[1, 0] == pytest.approx(centres[0, 0] - 2.56)
        assert centres[:, 0].max() - centres[:, 0].min() > w / 2  # it wrapped
    if motion == "bouncing":
        dy = centres[1:, 1] - centres[:-1, 1]
        assert (dy > 0).any() and (dy < 0).any()
        r = SIZES["large"] * h
        assert centres[:, 1].min() >= r - 1e-4 and centres[:, 1].max() <= h - r + 1e-4


def test_reader_recovers_the_generators_attributes() -> None:
    rng = random.Random(11)
    for _ in range(30):
        scene = sample_scene(rng.randrange(2**31), two_objects=0.0)
        reading = read_video(render(scene, 128, 192, 81))
        assert adherence(reading, scene) == dict.fromkeys(ATTRIBUTES, True), scene.prompt
        assert reading.visible == 1.0


def test_reader_sees_a_wrong_video_as_wrong() -> None:
    asked = scene_from("red", "circle", "left", "black")
    shown = scene_from("blue", "triangle", "right", "gray", size="small", speed="slowly")
    result = adherence(read_video(render(shown, 128, 192, 49)), asked)
    assert not any(result.values())


def test_flicker_psnr_ssim() -> None:
    frames = render(scene_from("red", "circle", "left", "black"), 64, 96, 9)
    assert background_flicker(frames) < 0.05  # anti-aliased edges only
    noisy = frames + 0.2 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    assert background_flicker(noisy.clamp(-1, 1)) > 5
    assert psnr(frames, frames) == float("inf") and ssim(frames, frames) == pytest.approx(1.0)
    assert 10 < psnr(frames, noisy) < 30 and ssim(frames, noisy) < 0.9
