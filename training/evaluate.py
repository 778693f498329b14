"""The quality evaluator: generate fixed prompts in every mode and score what the pixels show.

`python -m training.evaluate` (also `histream eval`; the table: `python -m bench --sections
quality`). For each mode, each scene of `SCENES` and each seed, a video is generated in process
(the mode's schedule, the toy preset's shipped weights), decoded, and read by
`training.scoring`: prompt adherence per attribute, background flicker (temporal consistency),
PSNR/SSIM against the `self-forcing` video of the same prompt and seed, and denoising seconds per
frame. Long videos of `LONG_SCENES` measure drift: does the object keep the asked colour and shape
in the last 2 seconds of 30?
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from histream_model.components import Components, load_components, resolve_weights
from histream_model.config import MODES
from histream_model.generator import HiStreamGenerator
from training.data import FPS, Scene, scene_from
from training.scoring import ATTRIBUTES, adherence, background_flicker, psnr, read_video, ssim

# (colour, shape, motion, background); sizes and speeds vary so every word is asked for.
_SPECS = (
    ("red", "circle", "left", "dark blue", "large", "quickly"),
    ("green", "square", "right", "black", "large", "quickly"),
    ("blue", "triangle", "up", "gray", "large", "slowly"),
    ("yellow", "circle", "down", "dark green", "small", "quickly"),
    ("orange", "square", "up and right", "dark blue", "large", "quickly"),
    ("purple", "circle", "down and left", "gray", "large", "slowly"),
    ("white", "triangle", "still", "dark red", "large", "quickly"),
    ("cyan", "square", "bouncing", "black", "large", "quickly"),
    ("red", "triangle", "down and right", "gray", "large", "quickly"),
    ("green", "circle", "up and left", "dark red", "small", "quickly"),
    ("blue", "square", "left", "black", "small", "slowly"),
    ("yellow", "triangle", "right", "dark blue", "large", "slowly"),
    ("white", "circle", "bouncing", "dark green", "large", "quickly"),
    ("orange", "circle", "still", "black", "small", "slowly"),
    ("purple", "square", "down", "dark green", "large", "quickly"),
    ("cyan", "triangle", "up", "dark red", "large", "quickly"),
)
SCENES: tuple[Scene, ...] = tuple(
    scene_from(c, s, m, b, size=z, speed=v) for c, s, m, b, z, v in _SPECS
)  # starting at the centre, as the training scenes do
LONG_SCENES: tuple[Scene, ...] = SCENES[:4]
REFERENCE_MODE = "self-forcing"


@dataclass
class VideoScore:
    mode: str
    prompt: str
    seed: int
    frames: int
    adherence: dict[str, bool]
    flicker: float
    seconds_per_frame: float
    reading: dict = field(default_factory=dict)
    psnr: float | None = None  # vs the reference mode's video of the prompt and seed
    ssim: float | None = None


def generate(
    components: Components, mode: str, prompt: str, seed: int, num_frames: int
) -> tuple[torch.Tensor, float]:
    """Decoded frames (F, 3, H, W) in [-1, 1] and denoising seconds per frame."""
    preset = components.preset
    generator = HiStreamGenerator(components.dit, preset, mode)
    context = components.text.encode([prompt])
    state = generator.start(context, preset.height, preset.width, num_frames, seed)
    decode_state = components.vae.new_decode_state()
    frames, seconds = [], 0.0
    while not state.done:
        chunk = generator.step(state)
        seconds += chunk.seconds
        decoded, decode_state = components.vae.decode_frames(chunk.latents, decode_state)
        frames.append(decoded)
    return torch.cat(frames), seconds / num_frames


def score_video(frames: torch.Tensor, scene: Scene) -> tuple[dict[str, bool], float, dict]:
    reading = read_video(frames)
    return adherence(reading, scene), background_flicker(frames), asdict(reading)


def evaluate(
    components: Components,
    modes: Sequence[str],
    scenes: Sequence[Scene] = SCENES,
    seeds: Sequence[int] = (0,),
    num_frames: int = 81,
    log: Callable[[str], None] | None = None,
) -> list[VideoScore]:
    """Every (mode, scene, seed) generated and scored; PSNR/SSIM when the reference mode ran."""
    scores = []
    reference: dict[tuple[str, int], torch.Tensor] = {}
    order = sorted(modes, key=lambda m: m != REFERENCE_MODE)  # the reference first
    for mode in order:
        started = time.perf_counter()
        for scene in scenes:
            for seed in seeds:
                frames, spf = generate(components, mode, scene.prompt, seed, num_frames)
                passed, flicker, reading = score_video(frames, scene)
                score = VideoScore(mode, scene.prompt, seed, num_frames, passed, flicker, spf,
                                   reading)  # fmt: skip
                if mode == REFERENCE_MODE:
                    reference[scene.prompt, seed] = frames
                elif (scene.prompt, seed) in reference:
                    score.psnr = psnr(frames, reference[scene.prompt, seed])
                    score.ssim = ssim(frames, reference[scene.prompt, seed])
                scores.append(score)
        if log:
            took = time.perf_counter() - started
            log(f"  {mode}: {len(scenes) * len(seeds)} videos in {took:.0f} s")
    return scores


@dataclass
class DriftScore:
    mode: str
    prompt: str
    colour_late: bool  # the asked colour in the last 2 s
    shape_late: bool
    colour_shift: float  # RGB distance, median object colour of the first vs the last 2 s


def drift(
    components: Components,
    modes: Sequence[str],
    scenes: Sequence[Scene] = LONG_SCENES,
    seconds: int = 30,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[DriftScore]:
    """Long videos (1 + 16 * seconds frames): attributes at the end against the start."""
    num_frames = 1 + FPS * seconds
    window = 2 * FPS
    out = []
    for mode in modes:
        started = time.perf_counter()
        for scene in scenes:
            frames, _ = generate(components, mode, scene.prompt, seed, num_frames)
            early, late = read_video(frames[:window]), read_video(frames[-window:])
            shift = float("nan")
            if early.object_rgb and late.object_rgb:
                shift = float(
                    torch.tensor(early.object_rgb).sub(torch.tensor(late.object_rgb)).norm()
                )
            obj = scene.objects[0]
            out.append(DriftScore(mode, scene.prompt, late.colour == obj.colour,
                                  late.shape == obj.shape, shift))  # fmt: skip
        if log:
            took = time.perf_counter() - started
            log(f"  {mode}: {len(scenes)} videos of {seconds} s in {took:.0f} s")
    return out


def summary(scores: Sequence[VideoScore], drifts: Sequence[DriftScore]) -> dict[str, dict]:
    """Per mode: adherence % per attribute, mean flicker, drift, PSNR/SSIM, s/frame."""
    out: dict[str, dict] = {}
    for mode in dict.fromkeys(s.mode for s in scores):
        mine = [s for s in scores if s.mode == mode]
        row = {a: 100.0 * statistics.mean(s.adherence[a] for s in mine) for a in ATTRIBUTES}
        row["flicker"] = statistics.mean(s.flicker for s in mine)
        row["seconds_per_frame"] = statistics.median(s.seconds_per_frame for s in mine)
        paired = [s for s in mine if s.psnr is not None]
        row["psnr"] = statistics.mean(s.psnr for s in paired) if paired else None
        row["ssim"] = statistics.mean(s.ssim for s in paired) if paired else None
        late = [d for d in drifts if d.mode == mode]
        if late:
            row["colour_30s"] = 100.0 * statistics.mean(d.colour_late for d in late)
            row["shape_30s"] = 100.0 * statistics.mean(d.shape_late for d in late)
            row["colour_shift_30s"] = statistics.mean(d.colour_shift for d in late)
        out[mode] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="histream eval", description=__doc__)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--frames", type=int, default=81, help="frames per video (81)")
    p.add_argument("--scenes", type=int, default=len(SCENES), help=f"first N of {len(SCENES)}")
    p.add_argument("--drift-seconds", type=int, default=30, help="0: no long videos")
    p.add_argument("--out", help="write every score as JSON here")
    p.add_argument("--weights", help="a trained folder (histream train --out); default: shipped")
    args = p.parse_args(argv)
    if not 1 <= args.scenes <= len(SCENES):
        raise SystemExit(f"--scenes={args.scenes} must be in [1, {len(SCENES)}]")
    weights = resolve_weights(args.weights) if args.weights else None
    components = load_components("toy", weights, device="cpu")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    scores = evaluate(components, args.modes, SCENES[: args.scenes], args.seeds, args.frames, log)
    drifts = (
        drift(components, args.modes, seconds=args.drift_seconds, log=log)
        if args.drift_seconds
        else []
    )
    result = {"summary": summary(scores, drifts), "videos": [asdict(s) for s in scores],
              "drift": [asdict(d) for d in drifts]}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
