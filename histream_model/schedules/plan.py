"""What one chunk does, as data: its phases, each a run of forward passes at one resolution.

A schedule (see `histream.py`) turns a video shape and a chunk index into a `ChunkPlan`; the
executor (`execute.py`) runs a plan's phases against per-resolution session state. Whoever runs
the phases (the in-process generator, or stages in different processes) reads the same plan, so
a new schedule is a new planner, not a new driver.

A phase's input is the result of the phase before it (or fresh noise), changed by its `entry`;
its result is the x0 of its last denoising pass, or its input when it only writes the cache. The
chunk's latents are the result of its output phase: the last phase that denoises.

Each phase's passes attend to one named cache (`Phase.cache`: "low" and "high" for HiStream;
one per denoising step for HiAR) and may leave the chunk in it (`Phase.write`): with a separate
kv-only pass on the clean result (Self-Forcing's and HiStream's t = 0 commit), on the result
re-noised to the next step's level (HiAR), or by keeping what the last denoising pass wrote
(Diagonal: no extra pass). The latent a write pass reads is its *write input*: for a clean
commit the chunk's output (or Down of it), otherwise a latent a restore cannot derive from the
output, which the executor therefore reports (`PhaseResult.write_input`).
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
    RENOISE = "renoise"  # the previous result (same resolution) re-noised to the first timestep


class Write(enum.StrEnum):
    """How a phase leaves the chunk in its cache (then the window slides)."""

    NONE = "none"  # not at all: its passes' keys/values are scratch
    CLEAN = "clean"  # a kv-only pass at t = 0 on the clean result (the commit pass)
    RENOISED = "renoised"  # a kv-only pass on the result re-noised to `write_t` (HiAR)
    LAST_PASS = "last-pass"  # the last denoising pass's keys/values stay (Diagonal): no pass


class PassKind(enum.StrEnum):
    DENOISE = "denoise"  # a denoising step: predicts x0 at a timestep
    COMMIT = "commit"  # a kv-only pass writing the chunk's keys/values into the cache


@dataclass(frozen=True)
class Phase:
    """Consecutive forward passes at one resolution, against one cache at that resolution."""

    resolution: Resolution  # whose latent size and RoPE the passes use
    entry: Entry  # where the input latent comes from
    timesteps: tuple[float, ...]  # warped timesteps of the denoising passes, in order
    first_draw: int  # noise draw of the entry; the re-noise before pass j (j >= 1) draws +j
    write: Write = Write.NONE  # how the chunk is left in the cache after the passes
    scale: float | None = None  # softmax scale of every pass here (None: 1/sqrt(head_dim))
    cache: str = ""  # the cache the passes attend to and write ("": named after the resolution)
    write_t: float = 0.0  # RENOISED: the timestep the result is re-noised to and written at
    write_draw: int = 0  # RENOISED: the noise draw of that re-noise

    def __post_init__(self) -> None:
        if not self.cache:
            object.__setattr__(self, "cache", str(self.resolution))
        if not self.timesteps and not self.commit:
            raise ValueError(f"a {self.resolution} phase must denoise or commit; it does neither")
        if self.entry == Entry.DOWNSAMPLE and self.timesteps:
            raise ValueError("a downsampled (clean) input cannot be denoised; it is only committed")
        if self.entry != Entry.DOWNSAMPLE and not self.timesteps:
            raise ValueError(f"a phase entered by {self.entry} must have denoising timesteps")
        if self.write == Write.LAST_PASS and not self.timesteps:
            raise ValueError("a phase with no denoising pass has no last pass to keep")
        if self.write == Write.RENOISED and not self.write_t > 0:
            raise ValueError(f"a re-noised write needs a timestep > 0, got {self.write_t}")

    @property
    def commit(self) -> bool:
        """Whether the phase leaves the chunk in its cache (by any `Write` but NONE)."""
        return self.write != Write.NONE

    @property
    def write_timestep(self) -> float:
        """The timestep of the pass whose keys/values the cache keeps (see `Write`)."""
        if self.write == Write.LAST_PASS:
            return self.timesteps[-1]
        return self.write_t if self.write == Write.RENOISED else 0.0

    @property
    def passes(self) -> tuple[PassKind, ...]:
        """The forward passes this phase runs, in order."""
        extra = self.write in (Write.CLEAN, Write.RENOISED)
        return (PassKind.DENOISE,) * len(self.timesteps) + (PassKind.COMMIT,) * extra


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
        for i in self.follow_ups:  # they run from the output alone: a clean commit of it
            if self.phases[i].write != Write.CLEAN:
                raise ValueError(f"phase {i} follows the output; it can only commit it clean")

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

    def caches(self) -> dict[str, Resolution]:
        """The caches the chunk's phases use, in first-use order, with their resolutions."""
        return {p.cache: p.resolution for p in self.phases}
