"""3D rotary position embedding (Wan2.1 layout) with absolute frame offsets and NTK scaling.

The head dimension is split into a frame axis and two spatial axes (128 -> 44/42/42 real
channels). Each axis rotates adjacent channel pairs by `position * theta_axis^(-2i/d_axis)`, where
`theta_axis = rope_theta * ntk_factor_axis`: HiStream's HD tech scales theta for height and width
at resolutions the model was not tuned at. Frame positions are absolute, so keys rotated before
they enter the KV cache keep their place in the video however the cache is laid out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from histream_model.config import DiTConfig


@dataclass(frozen=True)
class RopeAxes:
    """Inverse frequencies per axis (float64), fixed for one model and one resolution."""

    frame: torch.Tensor  # [d_frame / 2]
    height: torch.Tensor  # [d_height / 2]
    width: torch.Tensor  # [d_width / 2]

    @classmethod
    def build(
        cls, config: DiTConfig, ntk_factors: tuple[float, float, float] = (1, 1, 1)
    ) -> RopeAxes:
        axes = []
        for dim, factor in zip(config.rope_dims, ntk_factors, strict=True):
            theta = config.rope_theta * factor
            exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
            axes.append(1.0 / theta**exponent)
        return cls(*axes)


@dataclass(frozen=True)
class RopeTable:
    """Unit complex rotations per token for one grid of tokens, ready to rotate q and k."""

    rotations: torch.Tensor  # complex64 [L, 1, head_dim / 2]: cos + i sin of each angle


def rope_table(
    axes: RopeAxes,
    frame_start: int,
    grid: tuple[int, int, int],
    device: torch.device | str | None = None,
    frame_positions: Sequence[int] | None = None,
) -> RopeTable:
    """Rotation table for tokens (f, h, w), f in [frame_start, frame_start + F), row-major;
    or at explicit `frame_positions` (one per frame, e.g. an anchor then a later window)."""
    f, h, w = grid
    if frame_positions is None:
        frames = torch.arange(frame_start, frame_start + f, dtype=torch.float64)
    elif len(frame_positions) != f:
        raise ValueError(f"{len(frame_positions)} frame positions for a grid of {f} frames")
    else:
        frames = torch.tensor(frame_positions, dtype=torch.float64)
    angles = [
        torch.outer(frames, axes.frame),
        torch.outer(torch.arange(h, dtype=torch.float64), axes.height),
        torch.outer(torch.arange(w, dtype=torch.float64), axes.width),
    ]
    full = torch.cat(
        [
            angles[0][:, None, None, :].expand(f, h, w, -1),
            angles[1][None, :, None, :].expand(f, h, w, -1),
            angles[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)  # (L, 1, D/2)
    # Angles in float64 (positions up to ~1e3 times frequencies near 1), the table in complex64
    # (float32 parts): the rotation itself then runs in float32 without a float64 pass.
    rotations = torch.polar(torch.ones_like(full), full).to(torch.complex64)
    return RopeTable(rotations=rotations.to(device))


def apply_rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] as complex numbers.

    One complex multiply instead of real/imaginary arithmetic on strided halves: the same
    float32 products, without the four temporaries and the re-interleaving copy.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, D/2)
    return torch.view_as_real(pairs * table.rotations).flatten(-2).type_as(x)
