"""Configuration: model architectures, HiStream sampling options, generation modes and presets.

Every size in the library is derived from these frozen dataclasses and the requested resolution;
nothing downstream hard-codes a token count, a cache length or a layer count.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from histream_model.latent_stats import WAN_LATENTS_MEAN, WAN_LATENTS_STD

WAN_FPS = 16  # Wan2.1's frame rate: what its videos are trained and played at


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 DiT architecture (the fields of Wan's WanModel config.json)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) per token
    dim: int = 1536  # hidden size
    ffn_dim: int = 8960  # feed-forward inner size
    freq_dim: int = 256  # sinusoidal timestep embedding size
    num_heads: int = 12  # attention heads; head_dim = dim / num_heads
    num_layers: int = 30  # transformer blocks
    in_dim: int = 16  # latent channels in (the VAE's z_dim)
    out_dim: int = 16  # latent channels out (flow prediction)
    text_dim: int = 4096  # text encoder hidden size (UMT5-XXL)
    text_len: int = 512  # text tokens after zero padding
    eps: float = 1e-6  # norm epsilon
    rope_theta: float = 10000.0  # RoPE base before NTK scaling

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real channels per RoPE axis (frame, height, width): 128 -> (44, 42, 42)."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE architecture."""

    base_dim: int = 96  # channels of the first encoder stage
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per stage
    num_res_blocks: int = 2  # residual blocks per encoder stage (decoder uses one more)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling stage
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN  # per-channel latent statistics
    latents_std: tuple[float, ...] = WAN_LATENTS_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries; "
                f"dim_mult={self.dim_mult} needs {len(self.dim_mult) - 1}"
            )
        if not (len(self.latents_mean) == len(self.latents_std) == self.z_dim):
            raise ValueError(f"latents_mean/std must have z_dim={self.z_dim} entries")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        """Video frames -> latent frames for a causal VAE: 1 + 4k -> 1 + k."""
        return 1 + (num_frames - 1) // self.temporal_stride

    def video_frames(self, latent_frames: int) -> int:
        """Latent frames -> decoded frames: T -> 1 + 4(T - 1)."""
        return 1 + self.temporal_stride * (latent_frames - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which text encoder a preset uses."""

    kind: str = "umt5"  # "umt5" (transformers, from operator weights) or "builtin" (no weights)
    vocab_size: int = 4096  # builtin only: size of its hashed token table


class Resolution(enum.StrEnum):
    """The two resolutions of dual-resolution caching; each has its own cache and latent size."""

    LOW = "low"  # the tuned resolution: structure steps and KV_low
    HIGH = "high"  # the generated resolution: refinement steps and KV_high


@dataclass(frozen=True)
class ResolutionOptions:
    """Per-resolution HD knobs (HiStream appendix A.2, CineScale)."""

    ntk_factors: tuple[float, float, float] = (1.0, 1.0, 1.0)  # RoPE theta multiplier (f, h, w)


@dataclass(frozen=True)
class HiStreamOptions:
    """Sampling and caching options shared by every mode (paper defaults where it gives them)."""

    chunk_frames: int = 3  # M: latent frames generated per chunk
    anchor_frames: int = 1  # AGSW attention-sink frames kept for the whole video
    window_frames: int = 2  # AGSW most recent committed frames kept (M - 1)
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)  # 4-step list before the shift warp
    fast_timesteps: tuple[int, ...] = (1000, 500)  # 2-step list (HiStream+ later chunks, naive)
    shift: float = 7.0  # flow-matching timestep shift (5 in tuning, 7 at 1080p inference)
    num_train_timesteps: int = 1000
    low_res_factor: int = 2  # high-res latent = factor x low-res latent per side
    low: ResolutionOptions = ResolutionOptions(ntk_factors=(1.0, 2.0, 2.0))  # the tuned one
    high: ResolutionOptions = ResolutionOptions(ntk_factors=(1.0, 5.0, 5.0))  # the generated one
    first_chunk_attn_scale: float = 2.0  # CineScale factor c on chunk 1's high-res passes
    attn_reference_tokens: int | None = None  # N_ref; None = low-res tokens per latent frame
    # Diagonal distillation: steps of chunk 1, 2, ...; the last is the floor every later chunk
    # takes (strictly decreasing, each >= 1; the paper's description: 5, 4, 3, then 2)
    diagonal_steps: tuple[int, ...] = (5, 4, 3, 2)
    # histream-diagonal: what writes KV_low of chunks 2.. ("commit": a t = 0 pass on Down(x0);
    # "last-pass": the low-res denoising pass's keys/values, on pure noise at one step)
    diagonal_low_context: str = "commit"

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames={self.chunk_frames} must be >= 1")
        if self.anchor_frames < 0 or self.window_frames < 0:
            raise ValueError(
                f"anchor_frames={self.anchor_frames} and window_frames={self.window_frames} "
                "must be >= 0"
            )
        if self.low_res_factor < 1:
            raise ValueError(f"low_res_factor={self.low_res_factor} must be >= 1")
        if self.first_chunk_attn_scale <= 0:
            raise ValueError(f"first_chunk_attn_scale={self.first_chunk_attn_scale} must be > 0")
        check_diagonal_steps(self.diagonal_steps)
        if self.diagonal_low_context not in ("commit", "last-pass"):
            raise ValueError(
                f"diagonal_low_context={self.diagonal_low_context!r} must be 'commit' or "
                "'last-pass'"
            )

    def at(self, resolution: Resolution) -> ResolutionOptions:
        """The HD knobs of one resolution."""
        return self.low if resolution == Resolution.LOW else self.high

    def step_list(self, num_steps: int) -> tuple[int, ...]:
        """The unwarped timesteps for a chunk denoised in `num_steps` steps: `timesteps` or
        `fast_timesteps` when one has that many, else evenly spaced from the top down (the
        rule both defaults follow: 4 -> 1000, 750, 500, 250; 5 -> 1000, 800, ..., 200)."""
        for steps in (self.timesteps, self.fast_timesteps):
            if len(steps) == num_steps:
                return steps
        n = self.num_train_timesteps
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps={num_steps} must be in [1, {n}]")
        return tuple(round(n * (num_steps - k) / num_steps) for k in range(num_steps))


def check_diagonal_steps(steps: tuple[int, ...]) -> None:
    """A Diagonal step list: at least one count, each >= 1, strictly decreasing to its floor."""
    if not steps:
        raise ValueError(
            "diagonal_steps is empty; give the steps of chunk 1, 2, ... (e.g. 5,4,3,2)"
        )
    for i, count in enumerate(steps):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"diagonal_steps[{i}]={count!r} must be an integer >= 1 (the floor)")
        if i and count >= steps[i - 1]:
            raise ValueError(
                f"diagonal_steps={list(steps)} must decrease strictly: entry {i} ({count}) is not "
                f"below entry {i - 1} ({steps[i - 1]}); the last entry is the floor later chunks "
                "keep"
            )


@dataclass(frozen=True)
class Mode:
    """A generation mode: the paper's method, its ablations, or the Self-Forcing baseline."""

    name: str
    dual_resolution: bool  # DRC: low-res structure steps + KV_low, committed from Down(x0)
    sliding_window: bool  # AGSW (anchor + window) or full history
    first_chunk_steps: tuple[int, int]  # (low, high) denoising steps on chunk 1
    later_chunk_steps: tuple[int, int]  # (low, high) denoising steps on chunks 2..
    schedule: str = "histream"  # which schedule family plans its chunks (histream_model.schedules)
    summary: str = ""  # what the mode is, in a line (README's mode table, GET /v1/models)

    @property
    def resolutions(self) -> tuple[Resolution, ...]:
        """The resolutions whose caches a session of this mode holds."""
        return (Resolution.LOW, Resolution.HIGH) if self.dual_resolution else (Resolution.HIGH,)

    def steps(self, chunk_index: int) -> tuple[int, int]:
        return self.first_chunk_steps if chunk_index == 0 else self.later_chunk_steps


# fmt: off
MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("histream", True, True, (2, 2), (2, 2),
             summary="HiStream: DRC + AGSW, 2 + 2 steps"),
        Mode("histream+", True, True, (2, 2), (1, 1),
             summary="HiStream+: DRC + AGSW, 2 + 2 steps on chunk 1, 1 + 1 after"),
        Mode("no-drc", False, True, (0, 4), (0, 4),
             summary="ablation: AGSW, 4 high-res steps"),
        Mode("no-agsw", True, False, (2, 2), (2, 2),
             summary="ablation: DRC, full history"),
        Mode("naive-2step", True, True, (1, 1), (1, 1),
             summary="ablation: 1 + 1 steps always"),
        Mode("self-forcing", False, False, (0, 4), (0, 4),
             summary="baseline: 4 high-res steps, full history"),
        # Diagonal distillation: the step counts come from the preset's `diagonal_steps` (these
        # two fields are its defaults' first and floor); chunks 2.. are never committed at t = 0
        Mode("diagonal", False, True, (0, 5), (0, 2), schedule="diagonal",
             summary="Diagonal: 5, 4, 3, then 2 high-res steps; later chunks' context from "
                     "their last pass (no commit)"),
        Mode("histream-diagonal", True, True, (2, 2), (1, 1), schedule="diagonal",
             summary="HiStream+ steps with Diagonal context: KV_high from the last pass, "
                     "KV_low from Down(x0)"),
        # HiAR: one cache per denoising step, holding earlier chunks at the next step's noise
        Mode("hiar", False, True, (0, 4), (0, 4), schedule="hiar",
             summary="HiAR: 4 high-res steps, each against its own cache at its noise level"),
        Mode("histream-hiar", True, True, (2, 2), (2, 2), schedule="hiar",
             summary="HiAR with DRC: steps 1-2 at low resolution, 3-4 at high, a cache each"),
    )
}
# fmt: on


@dataclass(frozen=True)
class Preset:
    """Everything needed to build and run a model family at a default size."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextEncoderConfig
    options: HiStreamOptions
    height: int  # default output height (pixels)
    width: int  # default output width (pixels)
    num_frames: int = 81  # default output frames (1 + 4k)
    fps: int = WAN_FPS  # frame rate the model family was trained at
    max_height: int = 0  # largest height the service accepts (0 = the default height)
    max_width: int = 0
    max_num_frames: int = 481  # longest video the service accepts
    weights: str = ""  # shipped weights, relative to the histream_model package ("" = none)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.max_height:
            object.__setattr__(self, "max_height", self.height)
        if not self.max_width:
            object.__setattr__(self, "max_width", self.width)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="wan2.1-1.3b",
            dit=DiTConfig(),
            vae=VAEConfig(),
            text=TextEncoderConfig(kind="umt5"),
            options=HiStreamOptions(),
            height=1088,
            width=1920,
            description="Wan2.1-T2V-1.3B sizes; needs operator weights (--weights)",
        ),
        Preset(
            name="tiny",
            dit=DiTConfig(
                dim=64,
                ffn_dim=128,
                freq_dim=32,
                num_heads=2,
                num_layers=2,
                text_dim=32,
                text_len=16,
            ),
            vae=VAEConfig(base_dim=8, dim_mult=(1, 1, 2, 2), num_res_blocks=1),
            text=TextEncoderConfig(kind="builtin", vocab_size=1024),
            options=HiStreamOptions(
                shift=5.0, low=ResolutionOptions(), high=ResolutionOptions((1.0, 2.0, 2.0))
            ),
            height=128,
            width=192,
            max_height=256,
            max_width=384,
            description="random-weight CPU default: a whole 81-frame video in seconds",
        ),
        Preset(
            name="toy",
            dit=DiTConfig(
                dim=128,
                ffn_dim=512,
                freq_dim=64,
                num_heads=4,
                num_layers=4,
                text_dim=64,
                text_len=32,
            ),
            vae=VAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
            text=TextEncoderConfig(kind="builtin", vocab_size=4096),
            # Trained at both sizes, so no CineScale scaling of chunk 1 (factor 1); shift 2 puts
            # the last step at a lower noise level (sigma 0.4 of 4 steps) for a small model.
            options=HiStreamOptions(
                shift=2.0,
                low=ResolutionOptions(),
                high=ResolutionOptions((1.0, 2.0, 2.0)),
                first_chunk_attn_scale=1.0,
            ),
            height=128,
            width=192,
            max_height=256,
            max_width=384,
            weights="checkpoints/toy",
            description="trained here on procedural scenes (training/); its weights ship in "
            "histream_model/checkpoints/toy",
        ),
        Preset(
            name="bench",
            dit=DiTConfig(
                dim=256,
                ffn_dim=1024,
                freq_dim=64,
                num_heads=4,
                num_layers=4,
                text_dim=64,
                text_len=32,
            ),
            vae=VAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
            text=TextEncoderConfig(kind="builtin", vocab_size=4096),
            options=HiStreamOptions(
                shift=5.0, low=ResolutionOptions(), high=ResolutionOptions((1.0, 2.0, 2.0))
            ),
            height=384,
            width=640,
            description="random-weight CPU benchmark: attention-dominated like 1080p",
        ),
    )
}


# The embedded default of `histream generate/serve` and `make run`: the toy preset, whose shipped
# weights (trained by this project, issue 13) draw the prompt's scene; `tiny` stays the fastest
# random-weight preset for tests and benchmarks.
DEFAULT_PRESET = "toy"

T = TypeVar("T")


def choose(table: Mapping[str, T], name: str, what: str) -> T:
    """`table[name]`, or a ValueError naming the unknown `what` and the known names."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {list(table)}")
    return table[name]


def get_preset(name: str) -> Preset:
    return choose(PRESETS, name, "preset")


def get_mode(name: str) -> Mode:
    return choose(MODES, name, "mode")


def with_options(preset: Preset, **changes: object) -> Preset:
    """`preset` with some sampling options changed (validated), e.g. diagonal_steps=(4, 2)."""
    unknown = set(changes) - set(HiStreamOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown sampling options {sorted(unknown)}")
    return replace(preset, options=replace(preset.options, **changes))


def parse_steps(text: str) -> tuple[int, ...]:
    """ "5,4,3,2" -> (5, 4, 3, 2), checked as a Diagonal step list."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"diagonal steps {text!r} must be comma-separated whole numbers, e.g. 5,4,3,2"
        ) from None
    check_diagonal_steps(steps)
    return steps
