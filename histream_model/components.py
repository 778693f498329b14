"""The three models a generation needs (DiT, VAE, text encoder), from weights or a preset.

An operator points `--weights` at one directory; each model is found in it by the layouts the
public checkpoints use:
- DiT: `transformer/` (diffusers), one `*.pt` (Self-Forcing / HiStream generator), or the
  directory itself (original Wan2.1: `config.json` + safetensors);
- VAE: `vae/` (diffusers) or `Wan2.1_VAE.pth` (original);
- text encoder: `text_encoder/` + `tokenizer/` (diffusers layout, UMT5);
- tiny decoder (optional, `decoder="taehv"`): `taew2_1.safetensors` or `taew2_1.pth`.
Each can be given explicitly instead. Without weights, a preset that ships weights (`toy`, trained
here by `make train`) loads them through the same loaders; a random-weight preset (tiny, bench) is
built from its config. Both use the deterministic built-in text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from histream_model.config import Preset, TextEncoderConfig, choose, get_preset
from histream_model.dit import WanDiT, build_dit
from histream_model.taehv import TAEHV, build_taehv
from histream_model.text import TextEncoder, build_text_encoder
from histream_model.vae import WanVAE, build_vae
from histream_model.weights.common import WeightsError, require_path
from histream_model.weights.dit import load_dit
from histream_model.weights.vae import ORIGINAL_FILE_NAME, load_vae

# The compute dtypes a model can be loaded in, by the names settings, the CLI and the stage
# protocol use (the torch names without the "torch." prefix).
# The streaming decoders the decode pool and `histream generate` can use: the Wan VAE's decoder,
# or a TAEHV-layout tiny decoder of the same latent space (about 10x fewer FLOPs; see README).
DECODERS = ("wan", "taehv")
TINY_DECODER_FILES = ("taew2_1.safetensors", "taew2_1.pth")
StreamDecoder = WanVAE | TAEHV

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_named(name: str | None) -> torch.dtype | None:
    """The torch dtype of a name in DTYPES (None stays None: the device's default)."""
    return None if name is None else choose(DTYPES, name, "dtype")


@dataclass(frozen=True)
class WeightPaths:
    dit: Path
    vae: Path
    text_encoder: Path | None  # directory holding text_encoder/ + tokenizer/; None = builtin
    tiny_decoder: Path | None = None  # a TAEHV-layout checkpoint found beside them


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
    tiny = [root / name for name in TINY_DECODER_FILES if root is not None]
    tiny_path = next((p for p in tiny if p.is_file()), None)
    return WeightPaths(dit=dit_path, vae=vae_path, text_encoder=text_path, tiny_decoder=tiny_path)


@dataclass
class Components:
    """Models ready to generate, and the preset updated to the loaded architectures."""

    preset: Preset
    dit: WanDiT
    vae: StreamDecoder  # a WanVAE, or a TAEHV tiny decoder (decoder="taehv")
    text: TextEncoder


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as released), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(
    device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else default_device()
    return dev, dtype or default_dtype(dev)


CHECKPOINTS = Path(__file__).parent  # preset.weights is relative to the package


def shipped_weights(preset: Preset) -> WeightPaths | None:
    """The weights a preset ships with (`Preset.weights`), found as any weights directory is;
    None for a random-weight preset."""
    if not preset.weights:
        return None
    root = CHECKPOINTS / preset.weights
    if not (root / "transformer").is_dir():
        raise WeightsError(
            f"preset {preset.name!r} ships its weights in {str(root)!r}, which is missing; "
            "`make train` writes them"
        )
    return resolve_weights(root)


def _require_builtin(preset: Preset) -> None:
    if preset.text.kind != "builtin":
        raise WeightsError(
            f"preset {preset.name!r} has no built-in weights; pass a weights directory"
        )


def dit_for(
    preset: Preset,
    weights: WeightPaths | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> WanDiT:
    """The DiT from weights (given, or the preset's shipped ones), or the preset's
    deterministic random one."""
    dev, dt = _resolve_device(device, dtype)
    weights = weights or shipped_weights(preset)
    if weights is not None:
        return load_dit(weights.dit, device=dev, dtype=dt)
    _require_builtin(preset)
    return build_dit(preset, device=dev, dtype=dt)


def vae_for(
    preset: Preset,
    weights: WeightPaths | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> WanVAE:
    """The VAE from weights (given, or the preset's shipped ones), or the preset's
    deterministic random one."""
    dev, dt = _resolve_device(device, dtype)
    weights = weights or shipped_weights(preset)
    if weights is not None:
        return load_vae(weights.vae, device=dev, dtype=dt)
    _require_builtin(preset)
    torch.manual_seed(0)
    return build_vae(preset.vae, device=dev, dtype=dt)


def decoder_for(
    preset: Preset,
    decoder: str = "wan",
    weights: WeightPaths | None = None,
    decoder_weights: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> StreamDecoder:
    """The streaming decoder of `decoder` ("wan" | "taehv"): the Wan VAE (`vae_for`, or the
    checkpoint `decoder_weights`), or a TAEHV-layout tiny decoder from `decoder_weights`, else
    the `taew2_1.*` beside the weights; a random-weight preset without one gets a random one
    (deterministic), as its VAE is random too."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} is not one of {list(DECODERS)}")
    dev, dt = _resolve_device(device, dtype)
    path = decoder_weights
    if decoder == "taehv" and path is None and weights is not None:
        path = weights.tiny_decoder
    if path is None:
        if decoder == "wan":
            return vae_for(preset, weights, device, dtype)
        if weights is not None or preset.weights:
            raise WeightsError(
                f"decoder 'taehv' needs a TAEHV-layout checkpoint for preset {preset.name!r}'s "
                f"latent space: set decoder_weights (--decoder-weights), or put "
                f"{' or '.join(TINY_DECODER_FILES)} in the weights directory"
            )
        _require_builtin(preset)
        torch.manual_seed(0)
        model: StreamDecoder = build_taehv(device=dev, dtype=dt)
    else:
        model = load_vae(require_path(path, "decoder weights"), device=dev, dtype=dt)
    kind = "taehv" if isinstance(model, TAEHV) else "wan"
    if kind != decoder:
        raise WeightsError(
            f"decoder weights {str(path)!r} hold a {kind!r} decoder, not {decoder!r}"
        )
    channels = model.config.latent_channels if isinstance(model, TAEHV) else model.config.z_dim
    if channels != preset.vae.z_dim:
        raise WeightsError(
            f"decoder weights {str(path)!r} decode {channels} latent channels; preset "
            f"{preset.name!r} makes {preset.vae.z_dim}"
        )
    return model


def text_encoder_for(
    preset: Preset,
    weights: WeightPaths | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TextEncoder:
    """UMT5 when the weights have one, else the preset's built-in encoder.

    `preset.dit` must already describe the DiT in use (its text_dim / text_len).
    """
    dev, dt = _resolve_device(device, dtype)
    if weights is not None and weights.text_encoder is not None:
        config, root = TextEncoderConfig(kind="umt5"), weights.text_encoder
    elif preset.text.kind == "builtin":
        config, root = preset.text, None
    else:
        raise WeightsError(
            f"preset {preset.name!r} needs a UMT5 text encoder: pass a weights directory with "
            "text_encoder/ + tokenizer/"
        )
    return build_text_encoder(
        config, preset.dit.text_dim, preset.dit.text_len, root, device=dev, dtype=dt
    )


def load_components(
    preset: Preset | str,
    weights: WeightPaths | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    decoder: str = "wan",
    decoder_weights: str | Path | None = None,
) -> Components:
    """Load real weights when given, else build the preset's random-weight models. With
    `decoder="taehv"` the `vae` is a tiny decoder (`decoder_for`), which may not encode."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    dit = dit_for(preset, weights, device, dtype)
    vae = decoder_for(preset, decoder, weights, decoder_weights, device, dtype)
    # A tiny decoder leaves the preset's VAE config (strides, latent statistics) as it is.
    vae_config = vae.config if isinstance(vae, WanVAE) else preset.vae
    preset = replace(preset, dit=dit.config, vae=vae_config)
    text = text_encoder_for(preset, weights, device, dtype)
    return Components(preset=preset, dit=dit, vae=vae, text=text)
