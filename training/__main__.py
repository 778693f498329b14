"""`python -m training` (also `histream train`, `make train`): reproduce the toy preset's weights.

Steps: train the VAE on procedural clips, measure and fold its latent statistics, encode a set of
clips, train the causal DiT on them, then write the checkpoint in the original Wan2.1 layouts
(`transformer/`: config.json + safetensors; `vae/`: one safetensors file), a loss-curve PNG and a
model card. Everything follows from --seed; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from histream_model.config import get_preset
from histream_model.text import BuiltinTextEncoder
from histream_model.weights.vae import load_vae
from training.checkpoint import SHIPPED, write_card, write_checkpoint, write_loss_plot
from training.data import render, sample_scene
from training.distill import STUDENT_LR, ode_pairs
from training.dit import FIRST_CHUNK_SHARE, TOP_LEVEL_SHARE, encode_clips, train_dit
from training.vae import fold_statistics, latent_statistics, train_vae

DEFAULTS = {
    "vae_steps": 1200,
    "vae_stream_steps": 1000,
    "dit_steps": 3000,
    "clips": 320,
    "clip_frames": 57,
    "dit_batch": 8,
    # Distillation (training/distill.py): a teacher trained at every noise level for this many
    # steps draws `pairs` first chunks in `solve_steps` Euler steps, and the DiT (--dit-steps,
    # starting from the teacher) learns them at the top level; 0: no teacher.
    "teacher_steps": 0,
    "pairs": 4000,
    "solve_steps": 32,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histream train", description=__doc__)
    p.add_argument("--out", type=Path, default=SHIPPED, help=f"checkpoint folder ({SHIPPED})")
    p.add_argument("--seed", type=int, default=0, help="everything follows from it (0)")
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=value, help=f"default {value}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu)")
    p.add_argument(
        "--prompt-dropout",
        type=float,
        default=0.0,
        help="the teacher's share of empty-prompt examples, for guidance (0)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance of the teacher's solve (1: none)",
    )
    for flag, value, what in (
        ("--first-chunk-share", FIRST_CHUNK_SHARE, "first-chunk examples"),
        ("--top-level-share", TOP_LEVEL_SHARE, "examples at the top noise level"),
    ):
        p.add_argument(flag, type=float, default=value, help=f"the DiT's share of {what} ({value})")
    p.add_argument(
        "--vae-from", type=Path,
        help="reuse the VAE of an earlier run's folder (same seed and VAE steps give the same "
        "VAE): trains only the DiT",
    )  # fmt: skip
    return p


def _check(args: argparse.Namespace) -> None:
    for name in DEFAULTS:
        least = 0 if name in ("vae_stream_steps", "teacher_steps") else 1
        if getattr(args, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {least}")
    if not 0 <= args.prompt_dropout < 1:
        raise SystemExit(f"--prompt-dropout={args.prompt_dropout} must be in [0, 1)")
    for name in ("first_chunk_share", "top_level_share"):
        if not 0 <= getattr(args, name) <= 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag}={getattr(args, name)} must be in [0, 1]")
    if args.guidance < 1:
        raise SystemExit(f"--guidance={args.guidance} must be >= 1 (1: no guidance)")
    if (args.clip_frames - 1) % 4 or args.clip_frames < 21:
        raise SystemExit(
            f"--clip-frames={args.clip_frames} must be 1 + 4k and at least 21 (two chunks of 3 "
            "latent frames: a first chunk and one after context)"
        )


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def train(args: argparse.Namespace) -> dict:
    """Runs every stage; returns the model card's facts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset("toy")
    started = time.monotonic()
    if args.vae_from is not None:
        vae, vae_losses, vae_seconds = reused_vae(args.vae_from)
    else:
        vae, vae_losses = _train_vae(args, preset)
        vae_seconds = time.monotonic() - started
    vae = vae.to(args.device)
    text = BuiltinTextEncoder(preset.dit.text_dim, preset.dit.text_len, preset.text.vocab_size)
    with tqdm(total=args.clips, desc="encode", unit="clip", file=sys.stderr) as bar:
        clips = encode_clips(preset, vae, text, args.clips, args.clip_frames, args.seed + 1,
                             progress=bar.update, device=args.device)  # fmt: skip
    encode_seconds = time.monotonic() - started - (0 if args.vae_from else vae_seconds)
    with _bar(args.dit_steps, "DiT") as bar:
        dit_progress = _loss_progress(bar)

        dit, dit_losses = _train_dit(args, preset, clips, dit_progress)
    total = time.monotonic() - started
    facts = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_stream_steps": args.vae_stream_steps,
        "dit_steps": args.dit_steps,
        "clips": args.clips,
        "clip_frames": args.clip_frames,
        "dit_batch": args.dit_batch,
        "teacher_steps": args.teacher_steps,
        "pairs": args.pairs,
        "solve_steps": args.solve_steps,
        "prompt_dropout": args.prompt_dropout,
        "guidance": args.guidance,
        "first_chunk_share": args.first_chunk_share,
        "top_level_share": args.top_level_share,
        "device": str(args.device),
        "device_name": _device_name(args.device),
        "threads": torch.get_num_threads(),
        "vae_final_loss": _tail_mean(vae_losses),
        "dit_final_loss": _tail_mean(dit_losses),
        "seconds": {
            "vae": round(vae_seconds),
            "encode": round(encode_seconds),
            "dit": round(total - encode_seconds - (0 if args.vae_from else vae_seconds)),
            "total": round(total + (vae_seconds if args.vae_from else 0)),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.out, dit.cpu(), vae.cpu())
    write_loss_plot(args.out / "loss.png", vae_losses, dit_losses)
    (args.out / "losses.json").write_text(json.dumps({"vae": vae_losses, "dit": dit_losses}))
    if args.vae_from is not None:
        facts["vae_from"] = str(args.vae_from)
    (args.out / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_card(args.out, facts, preset)
    return facts


def _loss_progress(bar: tqdm):
    """A trainer's progress callback: one step on the bar, the step's loss beside it."""

    def progress(step: int, loss: float) -> None:
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")

    return progress


def _train_dit(args: argparse.Namespace, preset, clips, progress) -> tuple:
    """The DiT and its losses: flow matching on the clips, or (--teacher-steps) a teacher first,
    its pairs, then the DiT from the teacher on pairs and clips (training/distill.py)."""
    shares = {"first_chunk_share": args.first_chunk_share,
              "top_level_share": args.top_level_share}  # fmt: skip
    if not args.teacher_steps:
        return train_dit(preset, clips, args.dit_steps, args.seed + 2, batch=args.dit_batch,
                         progress=progress, **shares)  # fmt: skip
    with _bar(args.teacher_steps, "teacher") as bar:
        teacher_progress = _loss_progress(bar)

        teacher, _ = train_dit(preset, clips, args.teacher_steps, args.seed + 2,
                               batch=args.dit_batch, progress=teacher_progress, continuous=True,
                               top_level_share=0.0,
                               prompt_dropout=args.prompt_dropout)  # fmt: skip
    with tqdm(total=2 * args.pairs, desc="pairs", unit="chunk", file=sys.stderr) as bar:
        pairs = ode_pairs(teacher, preset, clips, args.pairs, args.solve_steps, args.seed + 3,
                          progress=bar.update, guidance=args.guidance)  # fmt: skip
    return train_dit(preset, clips, args.dit_steps, args.seed + 4, batch=args.dit_batch,
                     lr=STUDENT_LR, progress=progress, start=teacher, pairs=pairs,
                     **shares)  # fmt: skip


def _train_vae(args: argparse.Namespace, preset) -> tuple:
    """Train the VAE, then fold the latent statistics of 16 clips (seeds apart from training's)."""
    with _bar(args.vae_steps + args.vae_stream_steps, "VAE") as bar:
        vae_progress = _loss_progress(bar)

        vae, vae_losses = train_vae(
            preset.vae, args.vae_steps, args.seed, (preset.height, preset.width),
            stream_steps=args.vae_stream_steps, progress=vae_progress, device=args.device,
        )  # fmt: skip
    sample = torch.stack(
        [
            render(sample_scene(10**6 + i), preset.height, preset.width, 17).transpose(0, 1)
            for i in range(16)
        ]
    ).to(args.device)
    fold_statistics(vae, *latent_statistics(vae, sample))
    return vae, vae_losses


def reused_vae(folder: Path) -> tuple:
    """(VAE, its training losses, its training seconds) of an earlier run's output folder."""
    vae = load_vae(folder / "vae")
    losses = json.loads((folder / "losses.json").read_text())["vae"]
    facts = json.loads((folder / "facts.json").read_text())
    return vae, losses, float(facts["seconds"]["vae"])


def _device_name(device: str) -> str | None:
    """The accelerator's name (for the card), None on the CPU."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def _tail_mean(losses: Sequence[float], n: int = 100) -> float:
    """The mean of the last n losses (one step's loss is noisy)."""
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 5)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _check(args)
    facts = train(args)
    print(json.dumps(facts, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
