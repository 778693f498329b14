"""HiStream inference library: pure PyTorch (no serving imports)."""

from histream_model.components import DTYPES, load_components
from histream_model.config import (
    MODES,
    PRESETS,
    DiTConfig,
    HiStreamOptions,
    Mode,
    Preset,
    Resolution,
    VAEConfig,
    get_mode,
    get_preset,
)
from histream_model.dit import TextKV, WanDiT, build_dit
from histream_model.generator import HiStreamGenerator
from histream_model.schedules import ChunkPlan, Phase, plan_chunk, schedule_for
from histream_model.shape import VideoShape
from histream_model.vae import WanVAE, build_vae
from histream_model.weights.dit import load_dit
from histream_model.weights.vae import load_vae

__all__ = [
    "DTYPES",
    "MODES",
    "PRESETS",
    "ChunkPlan",
    "DiTConfig",
    "HiStreamGenerator",
    "HiStreamOptions",
    "Mode",
    "Phase",
    "Preset",
    "Resolution",
    "TextKV",
    "VAEConfig",
    "VideoShape",
    "WanDiT",
    "WanVAE",
    "build_dit",
    "build_vae",
    "get_mode",
    "get_preset",
    "load_components",
    "load_dit",
    "load_vae",
    "plan_chunk",
    "schedule_for",
]
