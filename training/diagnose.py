"""`python -m training.diagnose`: does a toy DiT draw the object from pure noise?

The few-step sampler commits to a scene at its first (top) level, from pure noise; every later
step refines what it drew. This measures that prediction on held-out first chunks: the mean
squared error of the predicted clean latents on the object's latent pixels (where the clip
differs from its background), against the object's variance there (a model that draws only the
background scores about the variance). Two targets: the scene where it was rendered (`placed`:
the frame's centre) and the scene moved to where the noise peaks (`noise-peak`, what
`training/dit.py` trains), at each resolution.

`--finetune STEPS` first trains the DiT for STEPS more steps on top-level first-chunk examples
alone (the part of training that teaches this), then measures again; `--out DIR` keeps it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from histream_model.components import Components, load_components, resolve_weights
from histream_model.config import Resolution
from histream_model.rope import RopeAxes
from training import dit as dit_training
from training.checkpoint import write_checkpoint

SCENES, SEED, NOISE_SEED = 8, 777, 5


def object_errors(components: Components) -> dict[str, dict[str, float]]:
    """Per target and resolution: the top-level object MSE and the object variance."""
    preset = components.preset
    patch = preset.dit.patch_size
    clips = dit_training.encode_clips(preset, components.vae, components.text, SCENES, 9, seed=SEED)
    top = dit_training.sampler_timesteps(preset)[-1]
    out: dict[str, dict[str, float]] = {}
    for resolution in Resolution:
        rope = RopeAxes.build(preset.dit, preset.options.at(resolution).ntk_factors)
        placed = clips.latents[resolution][:, :, : preset.options.chunk_frames]
        eps = torch.randn(placed.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        peaked = dit_training.centre_on(placed, dit_training.noise_peak(eps, patch), patch)
        sigma = top / preset.options.num_train_timesteps
        for target, x0 in (("placed", placed), ("noise-peak", peaked)):
            background = x0.median(dim=-1, keepdim=True).values.median(dim=-2, keepdim=True).values
            on_object = ((x0 - background).abs().mean(1, keepdim=True) > 0.3).expand_as(x0)
            noisy = (1 - sigma) * x0 + sigma * eps
            with torch.no_grad():
                flow = components.dit.forward_full(
                    noisy, torch.full((SCENES,), float(top)), clips.context, rope=rope
                )
            error = (noisy - sigma * flow - x0).pow(2)
            out[f"{target} {resolution.value}"] = {
                "object_mse": round(error[on_object].mean().item(), 3),
                "object_variance": round(x0[on_object].var().item(), 3),
            }
    return out


def finetune(components: Components, steps: int, seed: int, clips: int = 64) -> None:
    """`steps` steps on top-level first-chunk examples alone (`clips` clips of 21 frames), in
    place."""
    preset = components.preset
    data = dit_training.encode_clips(preset, components.vae, components.text, clips, 21, seed=1)
    dit_training.train_dit(preset, data, steps, seed, lr=1e-3, start=components.dit,
                           first_chunk_share=1.0, top_level_share=1.0)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.diagnose", description=__doc__)
    parser.add_argument("--weights", type=Path, required=True, help="a trained toy folder")
    parser.add_argument("--finetune", type=int, default=0, help="top-level steps first (0)")
    parser.add_argument("--clips", type=int, default=64, help="clips to fine-tune on (64)")
    parser.add_argument("--out", type=Path, help="where to write the fine-tuned checkpoint")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    components = load_components("toy", resolve_weights(args.weights))
    result = {"before": object_errors(components)}
    if args.finetune:
        finetune(components, args.finetune, seed=3, clips=args.clips)
        result["after"] = object_errors(components)
        if args.out is not None:
            write_checkpoint(args.out, components.dit, components.vae)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
