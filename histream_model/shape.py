"""The derived sizes of one video (latent frames, chunks, latent and token grids at each
resolution) and the checks that reject a size or length a preset and mode cannot produce,
naming the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field

from histream_model.config import Mode, Preset, Resolution


@dataclass(frozen=True)
class VideoShape:
    """Derived sizes of one video at one preset; validated on construction."""

    preset: Preset
    mode: Mode
    height: int
    width: int
    num_frames: int
    latent_frames: int = field(init=False)

    def __post_init__(self) -> None:
        check_video_shape(self.preset, self.mode, self.height, self.width, self.num_frames)
        object.__setattr__(self, "latent_frames", self.preset.vae.latent_frames(self.num_frames))

    @property
    def num_chunks(self) -> int:
        return self.latent_frames // self.preset.options.chunk_frames

    @property
    def high_latent_hw(self) -> tuple[int, int]:
        s = self.preset.vae.spatial_stride
        return (self.height // s, self.width // s)

    @property
    def low_latent_hw(self) -> tuple[int, int]:
        h, w = self.high_latent_hw
        f = self.preset.options.low_res_factor
        return (h // f, w // f)

    def latent_hw(self, resolution: Resolution) -> tuple[int, int]:
        return self.low_latent_hw if resolution == Resolution.LOW else self.high_latent_hw

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        _, ph, pw = self.preset.dit.patch_size
        return (latent_hw[0] // ph) * (latent_hw[1] // pw)


def check_video_shape(preset: Preset, mode: Mode, height: int, width: int, num_frames: int) -> None:
    """Reject a size or length the model cannot produce, naming the value and what is allowed."""
    _, ph, pw = preset.dit.patch_size
    stride = preset.vae.spatial_stride
    factor = preset.options.low_res_factor if mode.dual_resolution else 1
    for name, value, patch in (("height", height, ph), ("width", width, pw)):
        multiple = stride * patch * factor
        if value <= 0 or value % multiple:
            why = f"VAE stride {stride} x patch {patch}"
            if factor > 1:
                why += f" x low-res factor {factor} (mode {mode.name!r})"
            raise ValueError(f"{name}={value} must be a positive multiple of {multiple} ({why})")
    _check_first_chunk_tokens(preset, mode, height, width)
    t = preset.vae.temporal_stride
    if num_frames < 1 or (num_frames - 1) % t:
        lo = 1 + t * max(0, (num_frames - 1) // t)
        raise ValueError(
            f"num_frames={num_frames} must be 1 + {t}k (the VAE's temporal stride); "
            f"nearest valid values: {lo}, {lo + t}"
        )
    latent = preset.vae.latent_frames(num_frames)
    m = preset.options.chunk_frames
    if latent % m:
        below = max(m, latent - latent % m)
        valid = [preset.vae.video_frames(x) for x in (below, below + m)]
        raise ValueError(
            f"num_frames={num_frames} gives {latent} latent frames, not a whole number of "
            f"{m}-frame chunks; nearest valid values: {valid[0]}, {valid[1]}"
        )


def _check_first_chunk_tokens(preset: Preset, mode: Mode, height: int, width: int) -> None:
    """The first chunk's CineScale attention scale, log(N) / log(N_ref), needs N_ref >= 2: by
    default N_ref is the low-res tokens per latent frame, so a size must give at least two."""
    options = preset.options
    if options.first_chunk_attn_scale == 1.0 or options.attn_reference_tokens:
        return
    _, ph, pw = preset.dit.patch_size
    side_h, side_w = (preset.vae.spatial_stride * p * options.low_res_factor for p in (ph, pw))
    if (height // side_h) * (width // side_w) < 2:
        raise ValueError(
            f"size {width}x{height} is too small for mode {mode.name!r}: the first chunk's "
            f"attention scale needs at least 2 low-resolution tokens per frame, i.e. "
            f"(width // {side_w}) x (height // {side_h}) >= 2; the smallest sizes are "
            f"{2 * side_w}x{side_h} and {side_w}x{2 * side_h}"
        )
