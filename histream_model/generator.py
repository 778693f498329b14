"""HiStream inference (Algorithm 1) as explicit per-chunk steps over explicit session state.

For chunk i (M latent frames at absolute frames [iM, (i+1)M)):

1. `low_steps`    low-res denoising steps against KV_low, from fresh noise (lines 5-12);
2. `upsample`     Up(x0) to the high-res latent and re-noise to the first high-res timestep;
3. `high_steps`   high-res refinement steps against KV_high (lines 13-16, 26-29);
4. `commit_high`  t = 0 pass on the clean x0 writing KV_high (line 17);
5. `commit_low`   t = 0 pass on `downsample(x0)` writing KV_low: dual-resolution caching (line 18).
The caches slide their anchor-guided window as they commit (lines 19-25; see kv_cache.py).

Modes without dual-resolution caching skip 1, 2 and 5 and start `high_steps` from noise.
Each step reads only the state of its own resolution, so a caller can hold the low-res state in
one process and the high-res state in another (the distributed stages do); `HiStreamGenerator`
is the in-process driver that holds both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from histream_model.attention import scaled_softmax_scale
from histream_model.config import HiStreamOptions, Preset, VideoShape, get_mode, get_preset
from histream_model.dit import TextKV, WanDiT
from histream_model.kv_cache import CacheLayout, DualCache, KVCache
from histream_model.rope import RopeAxes
from histream_model.schedule import FlowSchedule, chunk_noise


@dataclass(frozen=True)
class ChunkPlan:
    """What one chunk does: its frames, its timesteps at each resolution, its softmax scales."""

    index: int  # chunk number, 0-based
    frame_start: int  # first latent frame (absolute)
    num_frames: int  # latent frames in the chunk (M)
    low_timesteps: tuple[float, ...]  # warped timesteps of the low-res steps (empty: no DRC)
    high_timesteps: tuple[float, ...]  # warped timesteps of the high-res steps
    high_scale: float | None  # softmax scale of high-res passes (None = 1/sqrt(d))

    @property
    def first_high_draw(self) -> int:
        """Index of the first noise draw used at high resolution within this chunk."""
        return len(self.low_timesteps)


def plan_chunk(shape: VideoShape, index: int) -> ChunkPlan:
    """The chunk's plan from the mode (steps per chunk) and the options (step lists, HD knobs)."""
    if not 0 <= index < shape.num_chunks:
        raise ValueError(f"chunk index {index} outside [0, {shape.num_chunks})")
    options = shape.preset.options
    low, high = shape.mode.steps(index)
    warped = FlowSchedule(options.shift, options.num_train_timesteps).warp(
        options.step_list(low + high)
    )
    scale = None
    if index == 0 and options.first_chunk_attn_scale != 1.0:
        reference = options.attn_reference_tokens or shape.tokens_per_frame(shape.low_latent_hw)
        scale = scaled_softmax_scale(
            shape.preset.dit.head_dim, options.first_chunk_attn_scale, reference
        )
    m = options.chunk_frames
    return ChunkPlan(
        index=index,
        frame_start=index * m,
        num_frames=m,
        low_timesteps=warped[:low],
        high_timesteps=warped[low:],
        high_scale=scale,
    )


@dataclass
class ResolutionState:
    """One resolution's share of a session: its cache, text K/V and RoPE frequencies."""

    latent_hw: tuple[int, int]  # latent height/width at this resolution
    rope: RopeAxes  # NTK-scaled frequencies for this resolution
    cache: KVCache  # this resolution's self-attention cache (KV_low or KV_high)
    text: TextKV  # cross-attention K/V of the current prompt
    denoise_passes: int = 0  # forward passes run so far, for reports
    commit_passes: int = 0


def new_resolution_state(
    model: WanDiT,
    shape: VideoShape,
    resolution: str,
    context: torch.Tensor,
    batch: int = 1,
) -> ResolutionState:
    """Fresh state for "low" or "high": an empty cache sized from the config and resolution."""
    options = shape.preset.options
    if resolution == "low":
        latent_hw, knobs = shape.low_latent_hw, options.low
    elif resolution == "high":
        latent_hw, knobs = shape.high_latent_hw, options.high
    else:
        raise ValueError(f"resolution must be 'low' or 'high', got {resolution!r}")
    tokens = shape.tokens_per_frame(latent_hw)
    layout = (
        CacheLayout.sliding_window(options, tokens)
        if shape.mode.sliding_window
        else CacheLayout.full_history(shape.latent_frames, tokens)
    )
    weight = model.patch_embedding.weight
    return ResolutionState(
        latent_hw=latent_hw,
        rope=RopeAxes.build(model.config, knobs.ntk_factors),
        cache=KVCache(layout, model.config, batch=batch, device=weight.device, dtype=weight.dtype),
        text=model.text_kv(context.to(weight.device)),
    )


def _schedule(options: HiStreamOptions) -> FlowSchedule:
    return FlowSchedule(options.shift, options.num_train_timesteps)


def _latent_shape(model: WanDiT, state: ResolutionState, plan: ChunkPlan, batch: int) -> tuple:
    return (batch, model.config.in_dim, plan.num_frames, *state.latent_hw)


@torch.no_grad()
def _denoise(
    model: WanDiT,
    state: ResolutionState,
    plan: ChunkPlan,
    options: HiStreamOptions,
    seed: int,
    x: torch.Tensor,
    timesteps: tuple[float, ...],
    first_draw: int,
    scale: float | None,
) -> torch.Tensor:
    """Steps at one resolution: predict x0, re-noise with fresh noise to the next timestep."""
    schedule = _schedule(options)
    slots = state.cache.slots(plan.frame_start, plan.num_frames)
    rope = model.chunk_rope(state.rope, slots, state.latent_hw)
    x0 = x
    for j, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        flow = model.forward_chunk(x, t_batch, state.text, state.cache, slots, rope, scale)
        assert flow is not None
        state.denoise_passes += 1
        x0 = schedule.x0_from_flow(x, flow, t)
        if j + 1 < len(timesteps):
            eps = chunk_noise(seed, plan.index, first_draw + j + 1, x.shape, x.device)
            x = schedule.renoise(x0, eps, timesteps[j + 1])
    return x0


def low_steps(
    model: WanDiT,
    low: ResolutionState,
    plan: ChunkPlan,
    options: HiStreamOptions,
    seed: int,
    batch: int = 1,
) -> torch.Tensor:
    """Structure steps at low resolution from fresh noise; returns the low-res x0 prediction."""
    x = chunk_noise(seed, plan.index, 0, _latent_shape(model, low, plan, batch), low.cache.k.device)
    return _denoise(model, low, plan, options, seed, x, plan.low_timesteps, 0, None)


def upsample(
    x0_low: torch.Tensor,
    plan: ChunkPlan,
    high_hw: tuple[int, int],
    options: HiStreamOptions,
    seed: int,
) -> torch.Tensor:
    """Up(x0) to the high-res latent, then re-noise to the first high-res timestep (line 8-11)."""
    f = x0_low.shape[2]
    up = F.interpolate(x0_low, size=(f, *high_hw), mode="trilinear", align_corners=False)
    eps = chunk_noise(seed, plan.index, plan.first_high_draw, up.shape, up.device)
    return _schedule(options).renoise(up, eps, plan.high_timesteps[0])


def high_steps(
    model: WanDiT,
    high: ResolutionState,
    plan: ChunkPlan,
    options: HiStreamOptions,
    seed: int,
    x: torch.Tensor | None = None,
    batch: int = 1,
) -> torch.Tensor:
    """Refinement steps at high resolution; from fresh noise when x is None (no DRC)."""
    if x is None:
        shape = _latent_shape(model, high, plan, batch)
        x = chunk_noise(seed, plan.index, plan.first_high_draw, shape, high.cache.k.device)
    first = plan.first_high_draw
    return _denoise(
        model, high, plan, options, seed, x, plan.high_timesteps, first, plan.high_scale
    )


def downsample(x0_high: torch.Tensor, low_hw: tuple[int, int]) -> torch.Tensor:
    """Down(x0): area-average the clean high-res latent to the low-res grid."""
    return F.interpolate(x0_high, size=(x0_high.shape[2], *low_hw), mode="area")


@torch.no_grad()
def _commit(
    model: WanDiT, state: ResolutionState, plan: ChunkPlan, x0: torch.Tensor, scale: float | None
) -> None:
    slots = state.cache.slots(plan.frame_start, plan.num_frames)
    rope = model.chunk_rope(state.rope, slots, state.latent_hw)
    t0 = torch.zeros((x0.shape[0],), device=x0.device)
    model.forward_chunk(x0, t0, state.text, state.cache, slots, rope, scale, kv_only=True)
    state.cache.commit(slots)
    state.commit_passes += 1


def commit_high(model: WanDiT, high: ResolutionState, plan: ChunkPlan, x0: torch.Tensor) -> None:
    """Write the chunk's clean high-res keys/values into KV_high (chunk 1 keeps its scale)."""
    _commit(model, high, plan, x0, plan.high_scale)


def commit_low(model: WanDiT, low: ResolutionState, plan: ChunkPlan, x0_down: torch.Tensor) -> None:
    """Dual-resolution caching: write KV_low from Down(x0), the downsampled final output."""
    if tuple(x0_down.shape[-2:]) != low.latent_hw:
        raise ValueError(
            f"commit_low needs Down(x0) at the low-res latent size {low.latent_hw}, "
            f"got {tuple(x0_down.shape[-2:])}"
        )
    _commit(model, low, plan, x0_down, None)


@dataclass
class SessionState:
    """Everything one in-process session carries between chunks."""

    shape: VideoShape
    seed: int
    high: ResolutionState
    low: ResolutionState | None  # None without dual-resolution caching
    next_chunk: int = 0

    @property
    def caches(self) -> DualCache:
        return DualCache(low=self.low.cache if self.low else None, high=self.high.cache)

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.shape.num_chunks


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


class HiStreamGenerator:
    """In-process driver of Algorithm 1: holds a model, runs sessions chunk by chunk."""

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
        """A new session: validates the size, sizes and allocates both caches, encodes text K/V."""
        shape = VideoShape(self.preset, self.mode, height, width, num_frames)
        batch = context.shape[0]
        with torch.no_grad():
            high = new_resolution_state(self.model, shape, "high", context, batch)
            low = (
                new_resolution_state(self.model, shape, "low", context, batch)
                if self.mode.dual_resolution
                else None
            )
        return SessionState(shape=shape, seed=seed, high=high, low=low)

    @torch.no_grad()
    def set_prompt(self, state: SessionState, context: torch.Tensor) -> None:
        """Condition the following chunks on a new prompt; the caches are kept."""
        for res in (state.high, state.low):
            if res is not None:
                res.text = self.model.text_kv(context.to(res.cache.k.device))

    def step(self, state: SessionState) -> ChunkResult:
        """Generate the session's next chunk (Algorithm 1, lines 4-30)."""
        if state.done:
            raise ValueError(f"all {state.shape.num_chunks} chunks are already generated")
        plan = plan_chunk(state.shape, state.next_chunk)
        options, seed, model = self.preset.options, state.seed, self.model
        batch = state.high.text.k[0].shape[0]
        before = _passes(state)
        started = time.perf_counter()
        if state.low is not None:
            x0_low = low_steps(model, state.low, plan, options, seed, batch)
            x = upsample(x0_low, plan, state.high.latent_hw, options, seed)
            x0 = high_steps(model, state.high, plan, options, seed, x, batch)
            commit_high(model, state.high, plan, x0)
            commit_low(model, state.low, plan, downsample(x0, state.low.latent_hw))
        else:
            x0 = high_steps(model, state.high, plan, options, seed, None, batch)
            commit_high(model, state.high, plan, x0)
        if x0.is_cuda:
            torch.cuda.synchronize(x0.device)
        seconds = time.perf_counter() - started
        after = _passes(state)
        state.next_chunk += 1
        return ChunkResult(
            index=plan.index,
            latents=x0,
            low_steps=after[0] - before[0],
            high_steps=after[2] - before[2],
            low_passes=after[0] + after[1] - before[0] - before[1],
            high_passes=after[2] + after[3] - before[2] - before[3],
            seconds=seconds,
            kv_bytes=state.caches.nbytes(),
        )

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


def _passes(state: SessionState) -> tuple[int, int, int, int]:
    low = (state.low.denoise_passes, state.low.commit_passes) if state.low else (0, 0)
    return (*low, state.high.denoise_passes, state.high.commit_passes)
