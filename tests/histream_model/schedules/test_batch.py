"""Cross-session batching: phases of several sessions run as one batched pass sequence give
each session, bit for bit, the latents and caches it gets alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from histream_model.components import load_components
from histream_model.config import get_mode
from histream_model.schedules import (
    ResolutionState,
    handoff,
    new_session_states,
    plan_chunk,
    run_chunk,
)
from histream_model.schedules.execute import BatchMember, batch_key, run_phase_batch
from histream_model.shape import VideoShape

H, W, FRAMES = 64, 96, 45  # 12 latent frames: 4 chunks, the sliding window wraps


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


@dataclass
class Session:
    shape: VideoShape
    seed: int
    states: dict[str, ResolutionState]
    start_tick: int
    chunk: int = 0
    phase: int = 0
    received: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.chunk == self.shape.num_chunks


def _sessions(tiny, specs):
    out = []
    for mode, seed, prompt, start in specs:
        shape = VideoShape(tiny.preset, get_mode(mode), H, W, FRAMES)
        context = tiny.text.encode([prompt])
        out.append(Session(shape, seed, new_session_states(tiny.dit, shape, context), start))
    return out


def _alone(tiny, session: Session) -> list[torch.Tensor]:
    states = {k: _copy_state(v) for k, v in session.states.items()}
    return [
        run_chunk(tiny.dit, states, session.shape, plan_chunk(session.shape, i), session.seed)
        for i in range(session.shape.num_chunks)
    ], states


def _copy_state(state: ResolutionState) -> ResolutionState:
    from copy import deepcopy

    return deepcopy(state)


def _run_batched(tiny, sessions: list[Session], max_batch: int) -> list[int]:
    """Every tick, each started session's next phase; equal batch keys run together (up to
    `max_batch`). Returns the batch sizes run."""
    sizes, tick = [], 0
    options = tiny.preset.options
    while not all(s.done for s in sessions):
        ready = [s for s in sessions if not s.done and s.start_tick <= tick]
        groups: dict[tuple, list[Session]] = {}
        for s in ready:
            plan = plan_chunk(s.shape, s.chunk)
            phase = plan.phases[s.phase]
            key = (s.phase, batch_key(s.states[phase.cache], plan, phase))
            groups.setdefault(key, []).append(s)
        for group in groups.values():
            for first in range(0, len(group), max_batch):
                part = group[first : first + max_batch]
                plans = [plan_chunk(s.shape, s.chunk) for s in part]
                index = part[0].phase
                members = [
                    BatchMember(s.states[p.phases[index].cache], p, s.seed, s.received)
                    for s, p in zip(part, plans, strict=True)
                ]
                sizes.append(len(part))
                results = run_phase_batch(tiny.dit, members, index, options)
                for s, plan, done in zip(part, plans, results, strict=True):
                    if s.phase == plan.output:
                        s.outputs.append(done.latents)
                    if s.phase + 1 < len(plan.phases):
                        s.received = handoff(s.shape, plan.phases[s.phase + 1], done.latents)
                        s.phase += 1
                    else:
                        s.chunk, s.phase, s.received = s.chunk + 1, 0, None
        tick += 1
    return sizes


def test_a_batch_of_sessions_at_different_chunks_equals_each_alone(tiny):
    specs = [
        ("histream", 1, "a red fox", 0),
        ("histream", 2, "a blue whale", 0),
        ("histream", 3, "a red fox", 1),  # one chunk behind: other positions and ring slots
        ("histream+", 4, "a green tree", 0),  # later chunks: 1 step, chunk 0 batches with them
        ("no-drc", 5, "a cat", 2),
        ("self-forcing", 6, "a dog", 0),  # full history: another cache layout
    ]
    sessions = _sessions(tiny, specs)
    expected = [_alone(tiny, s) for s in sessions]
    sizes = _run_batched(tiny, sessions, max_batch=8)
    assert max(sizes) >= 3  # batches really formed
    for s, (latents, states) in zip(sessions, expected, strict=True):
        assert len(s.outputs) == s.shape.num_chunks
        for got, want in zip(s.outputs, latents, strict=True):
            assert torch.equal(got, want)
        for name, state in s.states.items():
            assert torch.equal(state.cache.k, states[name].cache.k)
            assert torch.equal(state.cache.v, states[name].cache.v)
            assert state.cache.frames_committed == states[name].cache.frames_committed
            assert state.denoise_passes == states[name].denoise_passes
            assert state.commit_passes == states[name].commit_passes


def test_other_seeds_batch_too(tiny):
    """HiAR (a cache per step, renoised writes) and Diagonal (last-pass writes)."""
    specs = [(m, seed, f"a fox {seed}", 0) for m in ("hiar", "diagonal") for seed in (1, 2)]
    sessions = _sessions(tiny, specs)
    expected = [_alone(tiny, s) for s in sessions]
    assert max(_run_batched(tiny, sessions, max_batch=4)) >= 2
    for s, (latents, _) in zip(sessions, expected, strict=True):
        for got, want in zip(s.outputs, latents, strict=True):
            assert torch.equal(got, want)


def test_phases_of_different_keys_are_refused(tiny):
    a, b = _sessions(tiny, [("histream", 1, "x", 0), ("histream+", 2, "y", 0)])
    plan_a, plan_b = plan_chunk(a.shape, 0), plan_chunk(b.shape, 1)
    members = [
        BatchMember(a.states["low"], plan_a, 1),
        BatchMember(b.states["low"], plan_b, 2),
    ]
    with pytest.raises(ValueError, match="one batch key, got 2"):
        run_phase_batch(tiny.dit, members, 0, tiny.preset.options)


def test_the_batching_benchmark_times_the_same_work_both_ways(tiny):
    """`python -m bench --sections batching`: its two ways give each session the same video."""
    from bench.batching import run_sessions

    context = tiny.text.encode(["a red circle"])
    took_off, off = run_sessions(tiny, context, 3, 21, batched=False)
    took_on, on = run_sessions(tiny, context, 3, 21, batched=True)
    assert took_off > 0 and took_on > 0 and len(on) == 3 and len(on[0]) == 2  # 6 latent frames
    for alone, together in zip(off, on, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    assert not torch.equal(on[0][0], on[1][0])  # seeds differ per session
