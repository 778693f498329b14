"""The in-process driver of a schedule: one model, every resolution's state in this process.

What a chunk runs is planned and executed in `histream_model.schedules`; this module holds a
session's state between chunks, steps it, and reports what each chunk cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from histream_model.conditioning import PromptChange, cache_conditioning, conditioning
from histream_model.config import Preset, Resolution, get_mode, get_preset
from histream_model.dit import WanDiT
from histream_model.schedules import (
    ResolutionState,
    new_session_states,
    plan_chunk,
    run_chunk,
    set_text,
)
from histream_model.schedules.restore import reprefill, snapshot_chunks
from histream_model.shape import VideoShape


@dataclass
class SessionState:
    """Everything one in-process session carries between chunks."""

    shape: VideoShape
    seed: int
    states: dict[str, ResolutionState]  # one per cache the schedule names ("low", "high.3"...)
    next_chunk: int = 0
    prompts: list[PromptChange] = field(default_factory=list)  # the first from chunk 0
    conditioned_on: torch.Tensor | None = None  # the context the states' text K/V are of
    # sliding-window modes: the anchor and latest chunks' latents and write inputs, by chunk
    # (what a re-caching prompt change replays)
    history: dict[int, torch.Tensor] = field(default_factory=dict)
    writes: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def high(self) -> ResolutionState:
        """KV_high's state (HiStream's and Diagonal's schedules; HiAR names a cache per step)."""
        return self.states[Resolution.HIGH]

    @property
    def low(self) -> ResolutionState | None:
        """KV_low's state; None without dual-resolution caching."""
        return self.states.get(Resolution.LOW)

    def kv_bytes(self) -> dict[str, int]:
        """Bytes of the caches allocated at each resolution: {"low", "high"}."""
        out = {str(res): 0 for res in Resolution}
        for state in self.states.values():
            out[state.resolution] += state.cache.nbytes
        return out

    def text_bytes(self) -> int:
        """Bytes of the text K/V (one copy, shared by every cache state)."""
        return sum({id(s.text): s.text.nbytes for s in self.states.values()}.values())

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.shape.num_chunks

    def passes(self) -> dict[tuple[Resolution, str], int]:
        """Forward passes run so far, by (resolution, "denoise" or "commit")."""
        out = {(res, kind): 0 for res in Resolution for kind in ("denoise", "commit")}
        for state in self.states.values():
            out[state.resolution, "denoise"] += state.denoise_passes
            out[state.resolution, "commit"] += state.commit_passes
        return out


@dataclass(frozen=True)
class ChunkResult:
    """One generated chunk and what it cost."""

    index: int
    latents: torch.Tensor  # clean high-res latents [B, C, M, H, W], float32
    low_steps: int  # denoising passes at low resolution
    high_steps: int  # denoising passes at high resolution
    low_passes: int  # all low-res forward passes (denoising + commit)
    high_passes: int  # all high-res forward passes (denoising + commit)
    seconds: float  # wall time of the chunk's denoising and commits
    kv_bytes: dict[str, int] = field(default_factory=dict)  # {"low", "high"} allocated bytes
    # latents the chunk's cache writes read that a restore cannot derive from `latents`, by
    # phase index (HiAR's re-noised writes, Diagonal's kept last passes; see schedules/restore)
    write_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class HiStreamGenerator:
    """In-process driver of Algorithm 1: holds a model, runs sessions chunk by chunk."""

    recache_window = 2  # chunks besides the anchor a re-cache replays (snapshot_window_chunks)

    def __init__(self, model: WanDiT, preset: Preset | str, mode: str = "histream+") -> None:
        self.model = model
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        if self.preset.dit.patch_size[0] != 1:
            raise ValueError("chunked generation needs a temporal patch size of 1")
        self.mode = get_mode(mode)

    def start(
        self,
        context: torch.Tensor,
        height: int,
        width: int,
        num_frames: int,
        seed: int = 0,
    ) -> SessionState:
        """A new session: validates the size, sizes and allocates the caches, encodes text K/V."""
        shape = VideoShape(self.preset, self.mode, height, width, num_frames)
        batch = context.shape[0]
        with torch.no_grad():
            states = new_session_states(self.model, shape, context, batch)
        first = PromptChange(0, context)
        return SessionState(shape, seed, states, prompts=[first], conditioned_on=context)

    def set_prompt(
        self,
        state: SessionState,
        context: torch.Tensor,
        transition_chunks: int = 1,
        interpolation: str = "linear",
        recache: bool = False,
    ) -> None:
        """Condition the following chunks on a new prompt, reached over `transition_chunks`
        chunks (histream_model.conditioning); the caches are kept, or with `recache` rebuilt
        under the new conditioning from the anchor and the last `recache_window` chunks."""
        if recache and not state.shape.mode.sliding_window:
            raise ValueError(
                f"recache needs a sliding-window mode; {state.shape.mode.name!r} keeps every frame"
            )
        change = PromptChange(state.next_chunk, context, transition_chunks, interpolation, recache)
        state.prompts = [p for p in state.prompts if p.from_chunk < change.from_chunk] + [change]

    def step(self, state: SessionState) -> ChunkResult:
        """Generate the session's next chunk (Algorithm 1, lines 4-30)."""
        if state.done:
            raise ValueError(f"all {state.shape.num_chunks} chunks are already generated")
        plan = plan_chunk(state.shape, state.next_chunk)
        if any(c.recache and c.from_chunk == plan.index > 0 for c in state.prompts):
            self._recache(state)
        before = state.passes()
        started = time.perf_counter()
        context = conditioning(state.prompts, state.next_chunk)
        if context is not state.conditioned_on:
            set_text(self.model, state.states, context)
            state.conditioned_on = context
        writes: dict[int, torch.Tensor] = {}
        x0 = run_chunk(self.model, state.states, state.shape, plan, state.seed, writes=writes)
        if x0.is_cuda:
            torch.cuda.synchronize(x0.device)
        seconds = time.perf_counter() - started
        after = state.passes()
        ran = {key: after[key] - before[key] for key in after}
        low, high = Resolution.LOW, Resolution.HIGH
        state.next_chunk += 1
        if state.shape.mode.sliding_window:
            self._remember(state, plan.index, x0, writes)
        return ChunkResult(
            index=plan.index,
            latents=x0,
            low_steps=ran[low, "denoise"],
            high_steps=ran[high, "denoise"],
            low_passes=ran[low, "denoise"] + ran[low, "commit"],
            high_passes=ran[high, "denoise"] + ran[high, "commit"],
            seconds=seconds,
            kv_bytes=state.kv_bytes(),
            write_inputs=writes,
        )

    @torch.no_grad()
    def _recache(self, state: SessionState) -> None:
        """Rebuild every cache for chunk `next_chunk`: the anchor and the last chunks' commit
        passes replayed under the conditioning their entries now hold (cache_conditioning), as a
        stage's restore does."""
        done, shape = state.next_chunk, state.shape
        context = conditioning(state.prompts, done)
        batch = next(iter(state.states.values())).batch
        states = new_session_states(self.model, shape, context, batch)
        for fresh in states.values():
            reprefill(
                self.model, fresh, shape, lambda i: plan_chunk(shape, i), state.history,
                lambda j: cache_conditioning(state.prompts, j, done), done, state.writes,
            )  # fmt: skip
        set_text(self.model, states, context)
        state.states, state.conditioned_on = states, context

    def _remember(
        self, state: SessionState, index: int, x0: torch.Tensor, writes: dict[int, torch.Tensor]
    ) -> None:
        state.history[index] = x0
        state.writes.update({(index, phase): x for phase, x in writes.items()})
        keep = set(snapshot_chunks(index + 1, 1, self.recache_window))
        for old in [k for k in state.history if k not in keep]:
            del state.history[old]
        for key in [k for k in state.writes if k[0] not in keep]:
            del state.writes[key]

    def generate(
        self,
        context: torch.Tensor,
        height: int,
        width: int,
        num_frames: int,
        seed: int = 0,
    ) -> Iterator[ChunkResult]:
        state = self.start(context, height, width, num_frames, seed)
        while not state.done:
            yield self.step(state)
