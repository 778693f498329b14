"""HiStream inference library: pure PyTorch (no serving imports)."""

from histream_model.config import (
    MODES,
    PRESETS,
    DiTConfig,
    HiStreamOptions,
    Mode,
    Preset,
    VAEConfig,
    get_mode,
    get_preset,
)
from histream_model.dit import TextKV, WanDiT, build_dit
from histream_model.weights.dit import load_dit

__all__ = [
    "MODES",
    "PRESETS",
    "DiTConfig",
    "HiStreamOptions",
    "Mode",
    "Preset",
    "TextKV",
    "VAEConfig",
    "WanDiT",
    "build_dit",
    "get_mode",
    "get_preset",
    "load_dit",
]
