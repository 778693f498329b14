"""The `histream` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from histream_model.components import Components, WeightPaths, load_components, resolve_weights
from histream_model.config import MODES, PRESETS, VideoShape, get_mode, get_preset
from histream_model.text import check_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"one of {sorted(PRESETS)} (default: tiny)")
    p.add_argument("--weights", help="directory with operator-provided weights (see README)")
    p.add_argument("--dit", help="DiT checkpoint, overriding the one found in --weights")
    p.add_argument("--vae", help="VAE checkpoint, overriding the one found in --weights")
    p.add_argument("--text-encoder", help="directory with text_encoder/ + tokenizer/")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process (no Ray)")
    gen.add_argument("--prompt", required=True)
    _add_model_args(gen)
    gen.add_argument("--mode", default="histream+", help=f"one of {list(MODES)}")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-frames", type=int, help="1 + 4k frames (default: the preset's, 81)")
    gen.add_argument("--height", type=int, help="pixels (default: the preset's)")
    gen.add_argument("--width", type=int, help="pixels (default: the preset's)")
    gen.add_argument("--out", required=True, help="output MP4 path")
    gen.add_argument("--report", help="write a JSON timing report here")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def weights_from_args(args: argparse.Namespace) -> WeightPaths | None:
    if args.weights is None and args.dit is None:
        return None
    return resolve_weights(args.weights, args.dit, args.vae, args.text_encoder)


def components_from_args(args: argparse.Namespace, weights: WeightPaths | None) -> Components:
    return load_components(
        args.preset,
        weights,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from services.generate import generate_video

    # Everything a user can get wrong is checked before any model is built or loaded.
    preset = get_preset(args.preset)
    mode = get_mode(args.mode)
    prompt = check_prompt(args.prompt)
    VideoShape(
        preset,
        mode,
        preset.height if args.height is None else args.height,
        preset.width if args.width is None else args.width,
        preset.num_frames if args.num_frames is None else args.num_frames,
    )
    weights = weights_from_args(args)
    components = components_from_args(args, weights)
    report = generate_video(
        components,
        prompt,
        args.out,
        mode=args.mode,
        seed=args.seed,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        progress=not args.no_progress,
    )
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report.to_json())
    print(
        f"wrote {args.out} ({report.num_frames} frames, {report.width}x{report.height}); "
        f"denoising {report.denoise_seconds_per_frame:.4f} s/frame, "
        f"decoding {report.decode_seconds:.2f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"histream {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
