"""Preallocated self-attention KV caches: anchor-guided sliding window and full history.

Layout of one cache buffer along the token axis, in latent frames:

    [ anchor: A frames | ring: R frames ]

Frame f < A is stored in anchor slot f; frame f >= A in ring slot (f - A) mod R. With
R = W + M (W window frames, M chunk frames), writing a chunk's M frames overwrites exactly the
frames that fell out of the window, so the window slides without copying anything. Keys are
RoPE-rotated before they are written, and the current chunk attends to its whole context with
no mask, so the order of frames inside the buffer does not matter: the attended keys are always
the valid prefix `[0, context_tokens)` of the buffer. Until the ring has filled, that prefix holds
every frame so far; after, it holds the anchor + the W most recent committed frames + the chunk.

The full-history variant is the same buffer with A = 0 and R = every frame of the video.

During a chunk's denoising passes its keys/values are written into its slots (scratch: each
pass overwrites the last); the t = 0 commit pass writes the clean ones and `commit` makes them
part of the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histream_model.config import DiTConfig, HiStreamOptions, Resolution
from histream_model.shape import VideoShape


@dataclass(frozen=True)
class CacheLayout:
    """Frame capacity of a cache and where each frame lives in it."""

    anchor_frames: int  # A: first frames of the video, kept for the whole video
    ring_frames: int  # R: recent frames, overwritten in order
    tokens_per_frame: int  # tokens in one latent frame at this cache's resolution
    wraps: bool = True  # False: the ring never overwrites (full history of a fixed-length video)

    def __post_init__(self) -> None:
        if self.ring_frames < 1 or self.anchor_frames < 0 or self.tokens_per_frame < 1:
            raise ValueError(f"invalid cache layout {self}")

    @classmethod
    def sliding_window(cls, options: HiStreamOptions, tokens_per_frame: int) -> CacheLayout:
        """AGSW: anchor + window + the current chunk; independent of video length."""
        return cls(
            anchor_frames=options.anchor_frames,
            ring_frames=options.window_frames + options.chunk_frames,
            tokens_per_frame=tokens_per_frame,
        )

    @classmethod
    def full_history(cls, total_frames: int, tokens_per_frame: int) -> CacheLayout:
        """Every frame of a `total_frames`-frame video (the Self-Forcing / no-AGSW baseline)."""
        return cls(
            anchor_frames=0,
            ring_frames=total_frames,
            tokens_per_frame=tokens_per_frame,
            wraps=False,
        )

    @classmethod
    def for_shape(cls, shape: VideoShape, resolution: Resolution) -> CacheLayout:
        """The layout a session of `shape` holds at `resolution`: AGSW or full history."""
        tokens = shape.tokens_per_frame(shape.latent_hw(resolution))
        if shape.mode.sliding_window:
            return cls.sliding_window(shape.preset.options, tokens)
        return cls.full_history(shape.latent_frames, tokens)

    @property
    def capacity_frames(self) -> int:
        return self.anchor_frames + self.ring_frames

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_frames * self.tokens_per_frame

    def slot(self, frame: int) -> int:
        if frame < self.anchor_frames:
            return frame
        return self.anchor_frames + (frame - self.anchor_frames) % self.ring_frames

    def context_frames(self, frames_written: int) -> int:
        """Frames in the attended prefix once `frames_written` frames (chunk included) are in."""
        if frames_written <= self.anchor_frames:
            return frames_written
        return self.anchor_frames + min(self.ring_frames, frames_written - self.anchor_frames)


@dataclass(frozen=True)
class ChunkSlots:
    """Where one chunk's tokens go in the buffer and how much of the buffer it attends to."""

    frame_start: int  # first latent frame of the chunk (absolute)
    num_frames: int  # latent frames in the chunk
    segments: tuple[tuple[int, int, int], ...]  # (buffer token, chunk token, length) runs
    context_tokens: int  # attended prefix of the buffer, the chunk included


class KVCache:
    """One resolution's self-attention keys/values for every layer of one session."""

    def __init__(
        self,
        layout: CacheLayout,
        config: DiTConfig,
        batch: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layout = layout
        shape = (
            config.num_layers,
            batch,
            layout.capacity_tokens,
            config.num_heads,
            config.head_dim,
        )
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, tokens, H, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.frames_committed = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def skip_to(self, frame: int) -> None:
        """Treat the frames before `frame` as committed without writing them: a restore that
        replays only some chunks (re-prefill) leaves the others' slots as they are."""
        if frame < self.frames_committed:
            raise ValueError(f"cannot skip back to frame {frame}; {self.frames_committed} are in")
        self.frames_committed = frame

    def slots(self, frame_start: int, num_frames: int) -> ChunkSlots:
        """Plan the next chunk; chunks must arrive in order, one after the committed history."""
        if frame_start != self.frames_committed:
            raise ValueError(
                f"chunk starts at latent frame {frame_start} but the cache has "
                f"{self.frames_committed} committed frames; chunks must be generated in order"
            )
        if num_frames > self.layout.ring_frames:
            raise ValueError(
                f"a {num_frames}-frame chunk does not fit a ring of "
                f"{self.layout.ring_frames} frames"
            )
        end = frame_start + num_frames
        if not self.layout.wraps and end > self.layout.capacity_frames:
            raise ValueError(
                f"full-history cache holds {self.layout.ring_frames} frames; frame {end - 1} is "
                "past the end of the video it was sized for"
            )
        tpf = self.layout.tokens_per_frame
        runs: list[list[int]] = []
        for i, frame in enumerate(range(frame_start, end)):
            slot = self.layout.slot(frame)
            if runs and runs[-1][0] + runs[-1][2] == slot * tpf:
                runs[-1][2] += tpf
            else:
                runs.append([slot * tpf, i * tpf, tpf])
        return ChunkSlots(
            frame_start=frame_start,
            num_frames=num_frames,
            segments=tuple((a, b, n) for a, b, n in runs),
            context_tokens=self.layout.context_frames(end) * tpf,
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: ChunkSlots) -> None:
        """Store the chunk's k/v [B, tokens, H, D] for `layer` in its slots."""
        for buf_start, chunk_start, n in slots.segments:
            self.k[layer, :, buf_start : buf_start + n] = k[:, chunk_start : chunk_start + n]
            self.v[layer, :, buf_start : buf_start + n] = v[:, chunk_start : chunk_start + n]

    def context(self, layer: int, slots: ChunkSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values the chunk attends to at `layer` (views, no copy)."""
        n = slots.context_tokens
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def commit(self, slots: ChunkSlots) -> None:
        """The chunk's clean keys/values are written: make them history."""
        if slots.frame_start != self.frames_committed:
            raise ValueError(
                f"commit of frames from {slots.frame_start} but "
                f"{self.frames_committed} are committed"
            )
        self.frames_committed = slots.frame_start + slots.num_frames


@dataclass
class DualCache:
    """A session's caches: KV_low (None without dual-resolution caching) and KV_high."""

    low: KVCache | None
    high: KVCache

    def nbytes(self) -> dict[str, int]:
        return {"low": self.low.nbytes if self.low else 0, "high": self.high.nbytes}
