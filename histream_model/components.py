"""The three models a generation needs (DiT, VAE, text encoder), from weights or a preset.

An operator points `--weights` at one directory; each model is found in it by the layouts the
public checkpoints use:
- DiT: `transformer/` (diffusers), one `*.pt` (Self-Forcing / HiStream generator), or the
  directory itself (original Wan2.1: `config.json` + safetensors);
- VAE: `vae/` (diffusers) or `Wan2.1_VAE.pth` (original);
- text encoder: `text_encoder/` + `tokenizer/` (diffusers layout, UMT5).
Each can be given explicitly instead. Without weights, a random-weight preset (tiny, bench) is
built from its config, with the deterministic built-in text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from histream_model.config import Preset, TextEncoderConfig, get_preset
from histream_model.dit import WanDiT, build_dit
from histream_model.text import TextEncoder, build_text_encoder
from histream_model.vae import WanVAE, build_vae
from histream_model.weights.common import WeightsError, require_path
from histream_model.weights.dit import load_dit
from histream_model.weights.vae import ORIGINAL_FILE_NAME, load_vae


@dataclass(frozen=True)
class WeightPaths:
    dit: Path
    vae: Path
    text_encoder: Path | None  # directory holding text_encoder/ + tokenizer/; None = builtin


def resolve_weights(
    weights_dir: str | Path | None,
    dit: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
) -> WeightPaths:
    """Find each model's checkpoint; a missing one fails naming what was looked for."""
    root = require_path(weights_dir, "weights") if weights_dir is not None else None
    if dit is not None:
        dit_path = require_path(dit, "DiT weights")
    elif root is None:
        raise WeightsError("no DiT weights: pass a weights directory or a DiT path")
    elif (root / "transformer").is_dir():
        dit_path = root / "transformer"
    else:
        generators = sorted(root.glob("*.pt"))
        if len(generators) > 1:
            raise WeightsError(
                f"{str(root)!r} holds several .pt files {[p.name for p in generators]}; "
                "choose one with --dit"
            )
        dit_path = generators[0] if generators else root
    if vae is not None:
        vae_path = require_path(vae, "VAE weights")
    elif root is not None and (root / "vae").is_dir():
        vae_path = root / "vae"
    elif root is not None and (root / ORIGINAL_FILE_NAME).is_file():
        vae_path = root / ORIGINAL_FILE_NAME
    else:
        raise WeightsError(
            f"no VAE weights in {str(root)!r}: expected vae/ (diffusers) or {ORIGINAL_FILE_NAME}"
        )
    if text_encoder is not None:
        text_path: Path | None = require_path(text_encoder, "text encoder")
    elif root is not None and (root / "text_encoder").is_dir():
        text_path = root
    else:
        text_path = None
    return WeightPaths(dit=dit_path, vae=vae_path, text_encoder=text_path)


@dataclass
class Components:
    """Models ready to generate, and the preset updated to the loaded architectures."""

    preset: Preset
    dit: WanDiT
    vae: WanVAE
    text: TextEncoder


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as released), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_components(
    preset: Preset | str,
    weights: WeightPaths | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Components:
    """Load real weights when given, else build the preset's random-weight models."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if weights is None:
        if preset.text.kind != "builtin":
            raise WeightsError(
                f"preset {preset.name!r} has no built-in weights; pass a weights directory"
            )
        dit = build_dit(preset, device=device, dtype=dtype)
        torch.manual_seed(0)
        vae = build_vae(preset.vae, device=device, dtype=dtype)
    else:
        dit = load_dit(weights.dit, device=device, dtype=dtype)
        vae = load_vae(weights.vae, device=device, dtype=dtype)
    if weights is not None and weights.text_encoder is not None:
        text_config = TextEncoderConfig(kind="umt5")
    elif preset.text.kind == "builtin":
        text_config = preset.text
    else:
        raise WeightsError(
            f"preset {preset.name!r} needs a UMT5 text encoder: pass a weights directory with "
            "text_encoder/ + tokenizer/"
        )
    text = build_text_encoder(
        text_config,
        dit.config.text_dim,
        dit.config.text_len,
        weights_dir=weights.text_encoder if weights else None,
        device=device,
        dtype=dtype,
    )
    preset = replace(preset, dit=dit.config, vae=vae.config)
    return Components(preset=preset, dit=dit, vae=vae, text=text)
