"""Running a chunk plan: each phase against one cache's state; the chunk as its phases.

Each phase reads only the state of its own cache (the cache, text K/V and RoPE frequencies of
its resolution), so a caller can hold the low-res caches in one process and the high-res ones in
another (the distributed stages do) and compute the same latents as `run_chunk` does in one.
Between phases the latent travels in its smaller form: `handoff` downsamples on the sender's
side, `phase_input` upsamples on the receiver's (and downsamples what arrives undownsampled).
Noise is a pure function of (seed, chunk, draw), so no generator state travels either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histream_model.config import HiStreamOptions, Resolution
from histream_model.dit import CachedRow, TextKV, WanDiT
from histream_model.kv_cache import CacheLayout, ChunkSlots, KVCache
from histream_model.rope import RopeAxes, RopeTable
from histream_model.schedules.flow import FlowSchedule, chunk_noise
from histream_model.schedules.plan import ChunkPlan, Entry, Phase, Write
from histream_model.shape import VideoShape

# Wraps each part of a phase ("input", "denoise", "commit") for callers that time them.
Timer = Callable[[str], AbstractContextManager]
PhaseTimer = Callable[[Phase, str], AbstractContextManager]  # the same, for any phase of a chunk


def _untimed(*_: object) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class ResolutionState:
    """One cache of a session: the cache, and its resolution's text K/V and RoPE frequencies."""

    resolution: Resolution
    channels: int  # latent channels (the DiT's in_dim)
    latent_hw: tuple[int, int]  # latent height/width at this resolution
    rope: RopeAxes  # NTK-scaled frequencies for this resolution
    cache: KVCache  # this resolution's self-attention cache (KV_low or KV_high)
    text: TextKV  # cross-attention K/V of the current prompt
    denoise_passes: int = 0  # forward passes run so far, for reports
    commit_passes: int = 0
    name: str = ""  # the cache's name in the schedule's phases ("": the resolution's)

    def __post_init__(self) -> None:
        self.name = self.name or str(self.resolution)

    @property
    def batch(self) -> int:
        return self.text.k[0].shape[0]


def new_resolution_state(
    model: WanDiT,
    shape: VideoShape,
    resolution: Resolution | str,
    context: torch.Tensor,
    batch: int = 1,
    name: str = "",
    text: TextKV | None = None,
) -> ResolutionState:
    """Fresh state for one cache at `resolution` (named `name`, default the resolution's): an
    empty cache sized from the config, the text K/V (`text`, shared, if already computed)."""
    try:
        resolution = Resolution(resolution)
    except ValueError:
        raise ValueError(f"resolution must be 'low' or 'high', got {resolution!r}") from None
    layout = CacheLayout.for_shape(shape, resolution)
    weight = model.patch_embedding.weight
    return ResolutionState(
        resolution=resolution,
        channels=model.config.in_dim,
        latent_hw=shape.latent_hw(resolution),
        rope=RopeAxes.build(model.config, shape.preset.options.at(resolution).ntk_factors),
        cache=KVCache(layout, model.config, batch=batch, device=weight.device, dtype=weight.dtype),
        text=text if text is not None else model.text_kv(context.to(weight.device)),
        name=name,
    )


def set_text(
    model: WanDiT, states: Mapping[str, ResolutionState] | list, context: torch.Tensor
) -> None:
    """Condition every given state on `context`: the text K/V are computed once and shared by
    all the states (they do not depend on the cache or the resolution)."""
    states = list(states.values()) if isinstance(states, Mapping) else list(states)
    if not states:
        return
    with torch.no_grad():
        text = model.text_kv(context.to(states[0].cache.k.device))
    for state in states:
        state.text = text


def _flow(options: HiStreamOptions) -> FlowSchedule:
    return FlowSchedule(options.shift, options.num_train_timesteps)


def downsample(x0_high: torch.Tensor, low_hw: tuple[int, int]) -> torch.Tensor:
    """Down(x0): area-average the clean high-res latent to the low-res grid."""
    return F.interpolate(x0_high, size=(x0_high.shape[2], *low_hw), mode="area")


def upsample(x0_low: torch.Tensor, high_hw: tuple[int, int]) -> torch.Tensor:
    """Up(x0): trilinear interpolation of the low-res latent to the high-res grid."""
    size = (x0_low.shape[2], *high_hw)
    return F.interpolate(x0_low, size=size, mode="trilinear", align_corners=False)


def handoff(shape: VideoShape, phase: Phase, result: torch.Tensor) -> torch.Tensor:
    """What the previous phase's result travels as, to `phase`: downsampled before it leaves."""
    if phase.entry == Entry.DOWNSAMPLE:
        return downsample(result, shape.latent_hw(phase.resolution))
    return result


def phase_input(
    state: ResolutionState,
    plan: ChunkPlan,
    phase: Phase,
    options: HiStreamOptions,
    seed: int,
    received: torch.Tensor | None,
) -> torch.Tensor:
    """The phase's input latent from what it received (see `handoff`) or from noise."""
    device = state.cache.k.device
    if phase.entry == Entry.NOISE:
        shape = (state.batch, state.channels, plan.num_frames, *state.latent_hw)
        return chunk_noise(seed, plan.index, phase.first_draw, shape, device)
    if received is None:
        raise ValueError(f"a {phase.resolution} phase entered by {phase.entry} needs the latents")
    x = received.to(device=device)
    if phase.entry == Entry.DOWNSAMPLE:  # usually already done by the sender (`handoff`)
        same = tuple(x.shape[-2:]) == state.latent_hw
        return x if same else downsample(x, state.latent_hw)
    if phase.entry == Entry.UPSAMPLE:
        x = upsample(x, state.latent_hw)
    elif tuple(x.shape[-2:]) != state.latent_hw:
        raise ValueError(
            f"a {phase.entry} phase needs latents of {state.latent_hw}, got {tuple(x.shape[-2:])}"
        )
    eps = chunk_noise(seed, plan.index, phase.first_draw, x.shape, device)
    return _flow(options).renoise(x, eps, phase.timesteps[0])


@dataclass(frozen=True)
class BatchMember:
    """One session's phase in a cross-session batch (`run_phase_batch`)."""

    state: ResolutionState
    plan: ChunkPlan
    seed: int
    received: torch.Tensor | None = None


def batch_key(state: ResolutionState, plan: ChunkPlan, phase: Phase) -> tuple:
    """Phases with equal keys can run as one batched pass sequence: the same passes (timesteps,
    cache write, attention scale, noise draws) over latents of the same shape. Positions,
    context lengths, seeds and prompts may differ (they are per row)."""
    return (
        phase.resolution, phase.entry, phase.timesteps, phase.write, phase.write_t, phase.scale,
        phase.first_draw, phase.write_draw, plan.num_frames, state.latent_hw, state.batch,
        state.cache.k.dtype, str(state.cache.k.device),
    )  # fmt: skip


@dataclass(frozen=True)
class _Pass:
    """Where a phase's passes run: each member's chunk slots and RoPE table at one resolution.
    One member runs `forward_chunk` (any batch of its own); several, a cross-session batch of
    one row each, run `forward_chunk_rows`, each row with its own noise."""

    model: WanDiT
    members: tuple[BatchMember, ...]
    slots: tuple[ChunkSlots, ...]
    ropes: tuple[RopeTable, ...]
    scale: float | None
    text: TextKV

    @classmethod
    def of(cls, model: WanDiT, state: ResolutionState, plan: ChunkPlan, phase: Phase) -> _Pass:
        """One session's passes that draw no noise (a restore's replayed writes)."""
        return cls.rows(model, [BatchMember(state, plan, seed=0)], phase)

    @classmethod
    def rows(cls, model: WanDiT, members: list[BatchMember], phase: Phase) -> _Pass:
        slots = [m.state.cache.slots(m.plan.frame_start, m.plan.num_frames) for m in members]
        ropes = [
            model.chunk_rope(m.state.rope, s, m.state.latent_hw)
            for m, s in zip(members, slots, strict=True)
        ]
        texts = [m.state.text for m in members]
        text = texts[0] if len(texts) == 1 else TextKV(
            k=tuple(torch.cat(layer) for layer in zip(*(t.k for t in texts), strict=True)),
            v=tuple(torch.cat(layer) for layer in zip(*(t.v for t in texts), strict=True)),
        )  # fmt: skip
        return cls(model, tuple(members), tuple(slots), tuple(ropes), phase.scale, text)

    @property
    def batched(self) -> bool:
        return len(self.members) > 1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, kv_only: bool = False) -> torch.Tensor | None:
        if self.batched:
            rows = [
                CachedRow(m.state.cache, s, r)
                for m, s, r in zip(self.members, self.slots, self.ropes, strict=True)
            ]
            return self.model.forward_chunk_rows(x, t, self.text, rows, self.scale, kv_only)
        s = self.members[0].state
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        return self.model.forward_chunk(
            x, t_batch, s.text, s.cache, self.slots[0], self.ropes[0], self.scale, kv_only=kv_only
        )

    def noise(self, draw: int, like: torch.Tensor) -> torch.Tensor:
        """Draw `draw` of the chunk's noise, each member's from its own seed and chunk."""
        if not self.batched:
            m = self.members[0]
            return chunk_noise(m.seed, m.plan.index, draw, like.shape, like.device)
        one = (1, *like.shape[1:])
        return torch.cat(
            [chunk_noise(m.seed, m.plan.index, draw, one, like.device) for m in self.members]
        )

    def commit(self) -> None:
        """The chunk's keys/values are written: history in every member's cache."""
        for m, s in zip(self.members, self.slots, strict=True):
            m.state.cache.commit(s)

    def counted(self, kind: str) -> None:
        for m in self.members:
            setattr(m.state, kind, getattr(m.state, kind) + 1)


def _denoise(
    forward: _Pass, phase: Phase, options: HiStreamOptions, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The phase's steps: predict x0, re-noise it with fresh noise to the next timestep.
    Returns the last x0 and the last pass's input."""
    flow = _flow(options)
    x0 = x
    for j, t in enumerate(phase.timesteps):
        v = forward(x, t)
        assert v is not None
        forward.counted("denoise_passes")
        x0 = flow.x0_from_flow(x, v, t)
        if j + 1 < len(phase.timesteps):
            eps = forward.noise(phase.first_draw + j + 1, x)
            x = flow.renoise(x0, eps, phase.timesteps[j + 1])
    return x0, x


def _commit(forward: _Pass, x: torch.Tensor, t: float = 0.0) -> None:
    """The kv-only pass writing the chunk's keys/values of `x` at `t` (the clean x0 at t = 0
    for a commit); the window slides."""
    forward(x, t, kv_only=True)
    forward.commit()
    forward.counted("commit_passes")


@dataclass(frozen=True)
class PhaseResult:
    """What a phase gives: its result (see plan.py) and, when its cache write read a latent
    that cannot be derived from the chunk's output, that latent (a restore replays the write
    from it)."""

    latents: torch.Tensor
    write_input: torch.Tensor | None = None


def _run_members(
    model: WanDiT,
    members: list[BatchMember],
    phases: list[Phase],
    options: HiStreamOptions,
    timer: Timer = _untimed,
) -> list[PhaseResult]:
    """One phase (`phases[i]` of member i; they share a `batch_key` when several) as one pass
    sequence; a result per member."""
    for m, phase in zip(members, phases, strict=True):
        if m.state.resolution != phase.resolution or m.state.name != phase.cache:
            raise ValueError(f"a phase on cache {phase.cache!r} cannot run on {m.state.name!r}")
    phase = phases[0]
    with timer("input"):
        inputs = [
            phase_input(m.state, m.plan, p, options, m.seed, m.received)
            for m, p in zip(members, phases, strict=True)
        ]
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
    forward = _Pass.rows(model, members, phase)
    last_input = None
    if phase.timesteps:
        with timer("denoise"):
            x, last_input = _denoise(forward, phase, options, x)
    written = None
    if phase.write == Write.CLEAN:
        with timer("commit"):
            _commit(forward, x)
    elif phase.write == Write.RENOISED:  # the phase's x0 re-noised to its write timestep
        with timer("commit"):
            written = _flow(options).renoise(x, forward.noise(phase.write_draw, x), phase.write_t)
            _commit(forward, written, phase.write_t)
    elif phase.write == Write.LAST_PASS:  # the last pass wrote the keys/values: keep them
        forward.commit()
        written = last_input
    if not forward.batched:
        return [PhaseResult(x, written)]
    return [
        PhaseResult(x[i : i + 1], None if written is None else written[i : i + 1])
        for i in range(len(members))
    ]


def run_phase(
    model: WanDiT,
    state: ResolutionState,
    plan: ChunkPlan,
    phase: Phase,
    options: HiStreamOptions,
    seed: int,
    received: torch.Tensor | None = None,
    timer: Timer = _untimed,
) -> PhaseResult:
    """Run one phase against its cache's state; returns its result (see plan.py)."""
    member = BatchMember(state, plan, seed, received)
    return _run_members(model, [member], [phase], options, timer)[0]


def run_phase_batch(
    model: WanDiT,
    members: list[BatchMember],
    phase_index: int,
    options: HiStreamOptions,
) -> list[PhaseResult]:
    """Phase `phase_index` of each member's chunk plan, for several sessions at once: every
    forward pass of the phase runs once for all of them (`WanDiT.forward_chunk_rows`). The
    phases must have equal `batch_key`s and each session one video (state batch 1). Each
    member's result and cache are those `run_phase` gives it alone; its noise comes from its
    own seed and chunk."""
    phases = [m.plan.phases[phase_index] for m in members]
    keys = {batch_key(m.state, m.plan, p) for m, p in zip(members, phases, strict=True)}
    if len(keys) != 1:
        raise ValueError(f"phases of a batch must have one batch key, got {len(keys)}")
    if members[0].state.batch != 1:
        raise ValueError("batched phases take sessions of one video each (state batch 1)")
    return _run_members(model, members, phases, options)


def run_chunk(
    model: WanDiT,
    states: Mapping[str, ResolutionState],
    shape: VideoShape,
    plan: ChunkPlan,
    seed: int,
    timer: PhaseTimer = _untimed,
    writes: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every phase of the chunk in order, in this process; returns the chunk's clean latents.
    `states` holds every cache the plan's phases name (`Phase.cache`). The write inputs a
    restore needs (`PhaseResult.write_input`) go into `writes` by phase index, if given."""
    latents = received = None
    options = shape.preset.options
    for i, phase in enumerate(plan.phases):
        state = states[phase.cache]

        def part(name: str, phase: Phase = phase) -> AbstractContextManager:
            return timer(phase, name)

        done = run_phase(model, state, plan, phase, options, seed, received, part)
        if writes is not None and done.write_input is not None:
            writes[i] = done.write_input
        result = done.latents
        if i == plan.output:
            latents = result
        if i + 1 < len(plan.phases):
            received = handoff(shape, plan.phases[i + 1], result)
    assert latents is not None
    return latents
