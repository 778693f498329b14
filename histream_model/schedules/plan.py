"""What one chunk does, as data: its phases, each a run of forward passes at one resolution.

A schedule (see `histream.py`) turns a video shape and a chunk index into a `ChunkPlan`; the
executor (`execute.py`) runs a plan's phases against per-resolution session state. Whoever runs
the phases (the in-process generator, or stages in different processes) reads the same plan, so
a new schedule is a new planner, not a new driver.

A phase's input is the result of the phase before it (or fresh noise), changed by its `entry`;
its result is the x0 of its last denoising pass, or its input when it only writes the cache. The
chunk's latents are the result of its output phase: the last phase that denoises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from histream_model.config import Resolution


class Entry(enum.StrEnum):
    """How a phase gets its input latent."""

    NOISE = "noise"  # fresh noise at the phase's first timestep
    UPSAMPLE = "upsample"  # Up(previous result), re-noised to the phase's first timestep
    DOWNSAMPLE = "downsample"  # Down(previous result), clean: the input of a cache write


class PassKind(enum.StrEnum):
    DENOISE = "denoise"  # a denoising step: predicts x0 at a timestep
    COMMIT = "commit"  # the t = 0 pass writing clean keys/values into the cache (kv_only)


@dataclass(frozen=True)
class Phase:
    """Consecutive forward passes at one resolution, against that resolution's cache."""

    resolution: Resolution  # whose cache, latent size and RoPE the passes use
    entry: Entry  # where the input latent comes from
    timesteps: tuple[float, ...]  # warped timesteps of the denoising passes, in order
    first_draw: int  # noise draw of the entry; the re-noise before pass j (j >= 1) draws +j
    commit: bool  # after the passes, a t = 0 pass on the result writes and slides the cache
    scale: float | None = None  # softmax scale of every pass here (None: 1/sqrt(head_dim))

    def __post_init__(self) -> None:
        if not self.timesteps and not self.commit:
            raise ValueError(f"a {self.resolution} phase must denoise or commit; it does neither")
        if self.entry == Entry.DOWNSAMPLE and self.timesteps:
            raise ValueError("a downsampled (clean) input cannot be denoised; it is only committed")
        if self.entry != Entry.DOWNSAMPLE and not self.timesteps:
            raise ValueError(f"a phase entered by {self.entry} must have denoising timesteps")

    @property
    def passes(self) -> tuple[PassKind, ...]:
        """The forward passes this phase runs, in order."""
        commit = (PassKind.COMMIT,) if self.commit else ()
        return (PassKind.DENOISE,) * len(self.timesteps) + commit


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: its frames and its phases, run in order."""

    index: int  # chunk number, 0-based
    frame_start: int  # first latent frame (absolute)
    num_frames: int  # latent frames in the chunk (M)
    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases or self.phases[0].entry != Entry.NOISE:
            raise ValueError("a chunk plan starts with a phase from noise")
        if not any(p.timesteps for p in self.phases):
            raise ValueError("a chunk plan needs at least one denoising phase")

    @property
    def output(self) -> int:
        """Index of the phase whose result is the chunk's clean latents (the last denoiser)."""
        return max(i for i, p in enumerate(self.phases) if p.timesteps)

    @property
    def follow_ups(self) -> tuple[int, ...]:
        """Indices of the phases after the output: cache writes that follow the chunk."""
        return tuple(range(self.output + 1, len(self.phases)))

    def timesteps(self, resolution: Resolution) -> tuple[float, ...]:
        """Every denoising timestep at one resolution, in order."""
        return tuple(t for p in self.phases if p.resolution == resolution for t in p.timesteps)

    def passes(self) -> tuple[tuple[Resolution, PassKind], ...]:
        """Every forward pass of the chunk, in the order they run."""
        return tuple((p.resolution, kind) for p in self.phases for kind in p.passes)
