"""Shifted flow matching as used by Self-Forcing and HiStream, and counter-based noise.

A timestep t in [0, 1000] has noise level sigma = t / 1000; x_t = (1 - sigma) x0 + sigma eps and
the model predicts the flow v = eps - x0, so x0 = x_t - sigma v. Few-step lists such as
[1000, 750, 500, 250] are warped through the shift: sigma -> s sigma / (1 + (s - 1) sigma).

Noise is a pure function of (seed, chunk, draw): any stage of the distributed pipeline can draw a
chunk's noise without shipping generator state, and a restored session draws the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class FlowSchedule:
    shift: float  # timestep shift (5 in tuning, 7 at 1080p inference)
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0")

    def warp(self, steps: Sequence[int]) -> tuple[float, ...]:
        """Unwarped step list -> the timesteps the model is evaluated at."""
        n = self.num_train_timesteps
        out = []
        for step in steps:
            if not 0 < step <= n:
                raise ValueError(f"timestep {step} must be in (0, {n}]")
            sigma = step / n
            out.append(n * self.shift * sigma / (1 + (self.shift - 1) * sigma))
        return tuple(out)

    def sigma(self, t: float) -> float:
        return t / self.num_train_timesteps

    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t: float) -> torch.Tensor:
        return x_t - self.sigma(t) * flow

    def renoise(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """The paper's Psi: x0 back to noise level t with fresh noise eps."""
        sigma = self.sigma(t)
        return (1 - sigma) * x0 + sigma * eps


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, chunk: int, draw: int) -> int:
    """A 63-bit generator seed unique to (session seed, chunk index, draw within the chunk)."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ chunk)
    x = _splitmix64(x ^ draw)
    return x >> 1


def chunk_noise(
    seed: int,
    chunk: int,
    draw: int,
    shape: Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal float32 noise, drawn on the CPU so every device gets the same numbers."""
    g = torch.Generator().manual_seed(noise_seed(seed, chunk, draw))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device)
