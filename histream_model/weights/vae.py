"""Loading Wan2.1 VAE weights: the original `Wan2.1_VAE.pth` or a diffusers `AutoencoderKLWan`.

The model's parameter names are the original ones, so an original checkpoint loads as is and its
architecture is read off the tensor shapes; a diffusers directory is renamed key by key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from histream_model.config import VAEConfig
from histream_model.taehv import TAEHV
from histream_model.vae import WanVAE
from histream_model.weights.common import (
    StateDict,
    WeightsError,
    load_into,
    read_config,
    read_safetensors_dir,
    read_torch_file,
    rename_keys,
    require_path,
)
from histream_model.weights.taehv import is_taehv_state, load_taehv

ORIGINAL_FILE_NAME = "Wan2.1_VAE.pth"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

# diffusers residual-block parameter names -> the original's `residual` Sequential indices.
DIFFUSERS_RESNET_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def load_vae(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> WanVAE | TAEHV:
    """A WanVAE from an original checkpoint (file, or a folder holding one) or a diffusers folder,
    or a TAEHV-layout tiny decoder from a `taew2_1.pth` / `.safetensors` (recognised by its keys;
    it streams through the same interface).

    A diffusers pipeline folder (with a `vae/` subfolder) works too. The latent mean/std come from
    the diffusers config, or are Wan's constants for an original checkpoint (it does not hold them).
    """
    source = require_path(path, "VAE weights")
    if source.is_dir() and (source / "vae" / "config.json").exists():
        source = source / "vae"
    if source.is_dir() and (source / "config.json").exists():
        config = config_from_diffusers(read_config(source), str(source))
        state = diffusers_to_original(read_safetensors_dir(source), config.num_res_blocks)
    else:
        source = _original_file(source)
        state = _read_state_dict(source)
        if is_taehv_state(state):
            return load_taehv(state, str(source), device, dtype)
        config = config_from_original(state, str(source))
    # Built on meta: the checkpoint's tensors are assigned, not copied over a random init.
    with torch.device("meta"):
        model = WanVAE(config)
    load_into(model, state, str(source))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _original_file(path: Path) -> Path:
    if path.is_file():
        return path
    named = path / ORIGINAL_FILE_NAME
    if named.is_file():
        return named
    found = sorted(f for f in path.iterdir() if f.suffix in (*TORCH_SUFFIXES, ".safetensors"))
    if len(found) != 1:
        raise WeightsError(
            f"VAE folder {str(path)!r} has no config.json (diffusers) and no {ORIGINAL_FILE_NAME}; "
            f"expected exactly one checkpoint file, found {[f.name for f in found]}"
        )
    return found[0]


def _read_state_dict(file: Path) -> StateDict:
    state = load_file(str(file)) if file.suffix == ".safetensors" else read_torch_file(file)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"VAE checkpoint {str(file)!r} is not a flat state dict of tensors")
    return dict(state)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"VAE checkpoint {source!r} has no {key!r}; is it a Wan2.1 VAE?")
    return tuple(state[key].shape)


def config_from_original(state: Mapping[str, torch.Tensor], source: str) -> VAEConfig:
    """Read the architecture off an original checkpoint's keys and shapes.

    Encoder `downsamples` holds, per stage, `num_res_blocks` residual blocks and (all but the last
    stage) one resampler, which has a `time_conv` when that stage also halves time.
    """
    base_dim = _shape(state, "encoder.conv1.weight", source)[0]
    z_dim = _shape(state, "conv2.weight", source)[0]
    pattern = re.compile(r"encoder\.downsamples\.(\d+)\.(\w+)\.")
    blocks: dict[int, set[str]] = {}
    for key in state:
        if m := pattern.match(key):
            blocks.setdefault(int(m[1]), set()).add(m[2])
    resamplers = sorted(i for i, parts in blocks.items() if "resample" in parts)
    stages = len(resamplers) + 1
    res_blocks = len(blocks) - len(resamplers)
    if not res_blocks or res_blocks % stages:
        raise WeightsError(
            f"VAE checkpoint {source!r}: {res_blocks} encoder residual blocks do not split evenly "
            f"into {stages} stages"
        )
    per_stage = res_blocks // stages
    dim_mult = []
    for stage in range(stages):
        last_block = stage * (per_stage + 1) + per_stage - 1
        out_dim = _shape(state, f"encoder.downsamples.{last_block}.residual.6.weight", source)[0]
        if out_dim % base_dim:
            raise WeightsError(
                f"VAE checkpoint {source!r}: stage {stage} has {out_dim} channels, not a multiple "
                f"of base_dim={base_dim}"
            )
        dim_mult.append(out_dim // base_dim)
    temporal = tuple("time_conv" in blocks[i] for i in resamplers)
    return VAEConfig(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(dim_mult),
        num_res_blocks=per_stage,
        temporal_downsample=temporal,
    )


def config_from_diffusers(cfg: Mapping[str, Any], source: str) -> VAEConfig:
    """VAEConfig from an `AutoencoderKLWan` config.json; rejects variants this model lacks."""
    if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise WeightsError(f"{source!r} holds a {cfg['_class_name']!r}, not an AutoencoderKLWan")
    d = VAEConfig()
    base_dim = cfg.get("base_dim", d.base_dim)
    # (value, the only value this model supports): Wan2.2's VAE and attention variants are out.
    fixed = {
        "attn_scales": (list(cfg.get("attn_scales") or []), []),
        "is_residual": (cfg.get("is_residual", False), False),
        "patch_size": (cfg.get("patch_size"), None),
        "in_channels": (cfg.get("in_channels", 3), 3),
        "out_channels": (cfg.get("out_channels", 3), 3),
        "decoder_base_dim": (cfg.get("decoder_base_dim") or base_dim, base_dim),
    }
    for name, (value, allowed) in fixed.items():
        if value != allowed:
            raise WeightsError(f"{source!r}: {name}={value!r} is not supported (only {allowed!r})")
    try:
        return VAEConfig(
            base_dim=int(base_dim),
            z_dim=int(cfg.get("z_dim", d.z_dim)),
            dim_mult=tuple(int(m) for m in cfg.get("dim_mult", d.dim_mult)),
            num_res_blocks=int(cfg.get("num_res_blocks", d.num_res_blocks)),
            temporal_downsample=tuple(
                bool(t) for t in cfg.get("temperal_downsample", d.temporal_downsample)
            ),
            latents_mean=tuple(float(v) for v in cfg.get("latents_mean", d.latents_mean)),
            latents_std=tuple(float(v) for v in cfg.get("latents_std", d.latents_std)),
        )
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source!r}: bad AutoencoderKLWan config: {e}") from e


def diffusers_key_to_original(key: str, num_res_blocks: int) -> str:
    """One diffusers `AutoencoderKLWan` parameter name -> the original `WanVAE_` name.

    Unknown names come back unchanged, so the strict load reports them as unexpected keys.
    """
    top, _, rest = key.partition(".")
    if top == "quant_conv":
        return f"conv1.{rest}"
    if top == "post_quant_conv":
        return f"conv2.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    head, _, param = rest.partition(".")
    if head == "conv_in":
        return f"{top}.conv1.{param}"
    if head == "norm_out":
        return f"{top}.head.0.{param}"
    if head == "conv_out":
        return f"{top}.head.2.{param}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest):
        kind, index, tail = m[1], int(m[2]), m[3]
        # The middle is [resnet 0, attention 0, resnet 1].
        position = 1 if kind == "attentions" else 2 * index
        return f"{top}.middle.{position}.{_resnet_tail(tail) if kind == 'resnets' else tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{top}.downsamples.{m[1]}.{_resnet_tail(m[2])}"
    # Each decoder stage is num_res_blocks + 1 residual blocks, then its upsampler.
    per_stage = num_res_blocks + 2
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        index = int(m[1]) * per_stage + int(m[2])
        return f"{top}.upsamples.{index}.{_resnet_tail(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        index = int(m[1]) * per_stage + num_res_blocks + 1
        return f"{top}.upsamples.{index}.{m[2]}"
    return key


def _resnet_tail(tail: str) -> str:
    """`conv1.weight` -> `residual.2.weight` etc.; resampler names (`resample.1.*`) stay."""
    part, _, param = tail.partition(".")
    return f"{DIFFUSERS_RESNET_PARTS[part]}.{param}" if part in DIFFUSERS_RESNET_PARTS else tail


def diffusers_to_original(state: Mapping[str, torch.Tensor], num_res_blocks: int) -> StateDict:
    return rename_keys(state, lambda k: diffusers_key_to_original(k, num_res_blocks))
