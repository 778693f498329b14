"""Loading DiT weights: original Wan2.1, diffusers WanTransformer3DModel, Self-Forcing .pt.

The original Wan2.1 key names are our format of record; the other formats are renamed into it.
Whatever the tensor shapes reveal (sizes, layer count, patch) is inferred from them; a config file
supplies the rest (heads, eps, text length) and must agree with the shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from histream_model.config import DiTConfig
from histream_model.dit import WanDiT
from histream_model.weights.common import (
    StateDict,
    WeightsError,
    load_into,
    read_config,
    read_safetensors_dir,
    read_torch_file,
    require_path,
)

# diffusers -> original, applied in order as substring replacements (REFERENCE 5).
_DIFFUSERS_TO_WAN: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."),
    ("attn2.to_", "cross_attn."),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".norm2.", ".norm3."),
)
_SELF_FORCING_KEYS = ("generator_ema", "generator")
_DEFAULT_HEAD_DIM = 128  # every Wan2.1 model uses 128-channel heads


def diffusers_to_wan_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", key)
    for old, new in _DIFFUSERS_TO_WAN:
        key = key.replace(old, new)
    return key


def is_diffusers_state(state: StateDict) -> bool:
    return any(k.startswith("condition_embedder.") or k == "proj_out.weight" for k in state)


def infer_dit_config(state: StateDict, hints: dict | None = None, source: str = "") -> DiTConfig:
    """DiTConfig from original-format tensor shapes plus `hints` for what shapes cannot show."""
    hints = hints or {}
    try:
        dim, in_dim, *patch = state["patch_embedding.weight"].shape
        text_dim = state["text_embedding.0.weight"].shape[1]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        ffn_dim = state["blocks.0.ffn.0.weight"].shape[0]
        head_out = state["head.head.weight"].shape[0]
    except KeyError as missing:
        raise WeightsError(f"checkpoint {source!r} lacks {missing}: not a Wan2.1 DiT") from None
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    shapes = {
        "dim": dim,
        "in_dim": in_dim,
        "patch_size": tuple(patch),
        "text_dim": text_dim,
        "freq_dim": freq_dim,
        "ffn_dim": ffn_dim,
        "num_layers": num_layers,
        "out_dim": head_out // (patch[0] * patch[1] * patch[2]),
    }
    for name, value in shapes.items():
        hint = hints.get(name)
        if hint is None:
            continue
        hinted = tuple(hint) if isinstance(hint, (list, tuple)) else hint
        if hinted != value:
            raise WeightsError(
                f"checkpoint {source!r}: config says {name}={hinted} but the tensors have {value}"
            )
    num_heads = int(hints.get("num_heads") or max(1, dim // _DEFAULT_HEAD_DIM))
    return DiTConfig(
        patch_size=tuple(patch),  # type: ignore[arg-type]
        dim=dim,
        ffn_dim=ffn_dim,
        freq_dim=freq_dim,
        num_heads=num_heads,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=shapes["out_dim"],
        text_dim=text_dim,
        text_len=int(hints.get("text_len") or 512),
        eps=float(hints.get("eps") or 1e-6),
    )


def _diffusers_hints(cfg: dict, source: str) -> dict:
    if cfg.get("added_kv_proj_dim") or cfg.get("image_dim"):
        raise WeightsError(
            f"{source!r} is an image-to-video Wan model; only text-to-video is supported"
        )
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    cross_attn_norm = cfg.get("cross_attn_norm", True)
    if qk_norm != "rms_norm_across_heads" or not cross_attn_norm:
        raise WeightsError(
            f"{source!r}: qk_norm={qk_norm!r} cross_attn_norm={cross_attn_norm} differ from "
            "Wan2.1 (rms_norm_across_heads, True)"
        )
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    return {
        "num_heads": heads,
        "dim": heads * head_dim if heads and head_dim else None,
        "ffn_dim": cfg.get("ffn_dim"),
        "freq_dim": cfg.get("freq_dim"),
        "num_layers": cfg.get("num_layers"),
        "in_dim": cfg.get("in_channels"),
        "out_dim": cfg.get("out_channels"),
        "text_dim": cfg.get("text_dim"),
        "patch_size": cfg.get("patch_size"),
        "eps": cfg.get("eps"),
    }


def read_dit_state(path: str | Path) -> tuple[StateDict, dict, str]:
    """(state dict in original key names, config hints, description of the source)."""
    p = require_path(path, "DiT weights")
    source = str(p)
    if p.is_file() and p.suffix in (".pt", ".pth"):
        obj = read_torch_file(p)
        if isinstance(obj, dict):
            for key in _SELF_FORCING_KEYS:
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(
                f"{source!r} holds no state dict (expected tensors, optionally under "
                f"{' or '.join(_SELF_FORCING_KEYS)})"
            )
        state = {k.removeprefix("model."): v for k, v in obj.items()}
        hints: dict = {}
    elif p.is_file() and p.suffix == ".safetensors":
        state, hints = load_file(str(p)), {}
    elif p.is_dir():
        if (p / "transformer").is_dir():  # a diffusers pipeline directory
            return read_dit_state(p / "transformer")
        cfg = read_config(p)
        state = read_safetensors_dir(p)
        if cfg.get("_class_name") == "WanTransformer3DModel" or is_diffusers_state(state):
            hints = _diffusers_hints(cfg, source)
        else:
            if cfg.get("model_type", "t2v") != "t2v":
                raise WeightsError(
                    f"{source!r} is a Wan2.1 {cfg['model_type']!r} model; only t2v is supported"
                )
            hints = cfg
    else:
        raise WeightsError(
            f"DiT weights {source!r} must be a model directory (config.json + safetensors), "
            "a .safetensors file or a Self-Forcing .pt file"
        )
    if is_diffusers_state(state):
        state = {diffusers_to_wan_key(k): v for k, v in state.items()}
    return state, hints, source


def load_dit(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> WanDiT:
    """Load a Wan2.1-architecture DiT from any supported checkpoint format."""
    state, hints, source = read_dit_state(path)
    config = infer_dit_config(state, hints, source)
    with torch.device("meta"):
        model = WanDiT(config)
    load_into(model, state, source)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
