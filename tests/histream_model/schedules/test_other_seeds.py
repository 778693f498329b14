"""HiAR and Diagonal against references written from their descriptions (REFERENCE.md section 7),
straight on the DiT and its caches, not through the plans or the executor.

- HiAR runs "timestep-first" as its code does (every chunk at step 1, then every chunk at step
  2, ...), each step with its own cache; the schedule runs chunk by chunk. Same numbers, bit
  for bit: what lets a worker per step run the chunks as a wavefront.
- Diagonal: chunk i takes 5, 4, 3, then 2 steps; chunk 1 is committed by a t = 0 pass, every
  later chunk's keys/values are those its last denoising pass wrote.
"""

from __future__ import annotations

import pytest
import torch

from histream_model import PRESETS, build_dit
from histream_model.attention import scaled_softmax_scale
from histream_model.config import get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.kv_cache import CacheLayout, KVCache
from histream_model.rope import RopeAxes
from histream_model.schedules import FlowSchedule, chunk_noise
from histream_model.shape import VideoShape

TINY = PRESETS["tiny"]
H, W = 64, 96  # 8 x 12 high-res latents: 4 x 6 = 24 tokens per frame
SEED = 5


@pytest.fixture(scope="module")
def model():
    return build_dit(TINY)


def context() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, TINY.dit.text_len, TINY.dit.text_dim, generator=g)


def generated(model, mode: str, frames: int) -> list[torch.Tensor]:
    gen = HiStreamGenerator(model, TINY, mode)
    return [c.latents for c in gen.generate(context(), H, W, frames, seed=SEED)]


class Reference:
    """A high-res-only session on the bare DiT: fresh AGSW caches, text K/V, RoPE, the flow."""

    def __init__(self, model, frames: int) -> None:
        self.model = model
        options = TINY.options
        self.flow = FlowSchedule(options.shift)
        self.hw = (H // 8, W // 8)
        self.tokens = (self.hw[0] // 2) * (self.hw[1] // 2)
        self.layout = CacheLayout(1, 2 + 3, self.tokens)  # anchor 1, window 2 + chunk 3
        self.axes = RopeAxes.build(model.config, options.high.ntk_factors)
        self.text = model.text_kv(context())
        self.chunks = (1 + (frames - 1) // 4) // 3
        low_tokens = self.tokens // 4  # CineScale's reference: low-res tokens per frame
        self.first_scale = scaled_softmax_scale(model.config.head_dim, 2.0, low_tokens)

    def cache(self) -> KVCache:
        return KVCache(self.layout, self.model.config)

    def noise(self, chunk: int, draw: int) -> torch.Tensor:
        return chunk_noise(SEED, chunk, draw, (1, 16, 3, *self.hw))

    def forward(self, cache, chunk, x, t, kv_only=False):
        slots = cache.slots(3 * chunk, 3)
        rope = self.model.chunk_rope(self.axes, slots, self.hw)
        scale = self.first_scale if chunk == 0 else None
        t_batch = torch.full((1,), float(t))
        out = self.model.forward_chunk(x, t_batch, self.text, cache, slots, rope, scale, kv_only)
        return out, slots


def warp(steps: list[int]) -> list[float]:
    return [1000 * 5 * (s / 1000) / (1 + 4 * (s / 1000)) for s in steps]


@torch.no_grad()
def test_hiar_timestep_first_equals_the_schedule_chunk_by_chunk(model):
    ref = Reference(model, 45)  # 4 chunks
    ts = warp([1000, 750, 500, 250])
    caches = [ref.cache() for _ in ts]
    x = {n: ref.noise(n, 0) for n in range(ref.chunks)}
    out = {}
    for k, t in enumerate(ts):  # timestep-first: every chunk at step k before step k + 1
        for n in range(ref.chunks):
            v, slots = ref.forward(caches[k], n, x[n], t)
            x0 = ref.flow.x0_from_flow(x[n], v, t)
            if k + 1 < len(ts):  # into step k's cache: x0 re-noised to step k + 1's level
                x[n] = ref.flow.renoise(x0, ref.noise(n, k + 1), ts[k + 1])
                ref.forward(caches[k], n, x[n], ts[k + 1], kv_only=True)
            else:  # the last step's cache holds the clean chunk
                ref.forward(caches[k], n, x0, 0.0, kv_only=True)
                out[n] = x0
            caches[k].commit(slots)
    got = generated(model, "hiar", 45)
    assert all(torch.equal(got[n], out[n]) for n in range(ref.chunks))


@torch.no_grad()
def test_diagonal_keeps_the_last_pass_as_context(model):
    ref = Reference(model, 57)  # 5 chunks: 5, 4, 3, 2, 2 steps
    uniform = {5: [1000, 800, 600, 400, 200], 4: [1000, 750, 500, 250], 3: [1000, 667, 333],
               2: [1000, 500]}  # fmt: skip
    cache, out = ref.cache(), []
    for n, steps in enumerate([5, 4, 3, 2, 2]):
        ts = warp(uniform[steps])
        x = ref.noise(n, 0)
        for j, t in enumerate(ts):
            v, slots = ref.forward(cache, n, x, t)
            x0 = ref.flow.x0_from_flow(x, v, t)
            if j + 1 < len(ts):
                x = ref.flow.renoise(x0, ref.noise(n, j + 1), ts[j + 1])
        if n == 0:  # chunk 1: the clean t = 0 commit
            ref.forward(cache, n, x0, 0.0, kv_only=True)
        cache.commit(slots)  # later chunks: what the last pass wrote stays
        out.append(x0)
    got = generated(model, "diagonal", 57)
    assert all(torch.equal(a, b) for a, b in zip(got, out, strict=True))


def test_diagonal_runs_fewer_passes_later_and_no_commit(model):
    gen = HiStreamGenerator(model, TINY, "diagonal")
    chunks = list(gen.generate(context(), H, W, 57, seed=SEED))
    assert [c.high_steps for c in chunks] == [5, 4, 3, 2, 2]
    assert [c.high_passes - c.high_steps for c in chunks] == [1, 0, 0, 0, 0]  # commit passes
    hiar = list(HiStreamGenerator(model, TINY, "histream-hiar").generate(context(), H, W, 33))
    assert [(c.low_passes, c.high_passes) for c in hiar] == [(4, 4)] * 3  # a write per step


@pytest.mark.parametrize("mode", ["diagonal", "histream-diagonal", "hiar", "histream-hiar"])
def test_agsw_memory_is_flat_in_every_new_mode(model, mode):
    """The same cache bytes at chunk 3 as at chunk 20, and the same at 3x the length."""
    gen = HiStreamGenerator(model, TINY, mode)
    short = gen.start(context(), H, W, 33)
    long = gen.start(context(), H, W, 177)
    before = long.kv_bytes()
    for _ in range(15):
        gen.step(long)
    assert long.kv_bytes() == before == short.kv_bytes()
    shape = VideoShape(TINY, get_mode(mode), H, W, 177)
    assert shape.num_chunks == 15


@pytest.mark.parametrize(("mode", "workers"), [("hiar", 2), ("hiar", 4), ("histream-hiar", 2),
                                               ("histream-hiar", 4), ("diagonal", 1)])  # fmt: skip
def test_a_pipelined_run_gives_the_sequential_latents(model, mode, workers):
    """HiAR's wavefront, a worker (thread) per group of steps each holding only its steps'
    caches: the latents of the sequential run, bit for bit."""
    from histream_model.schedules import new_session_states, plan_chunk
    from histream_model.schedules.pipeline import PipelinedRun, split_phases

    shape = VideoShape(TINY, get_mode(mode), H, W, 45)
    plans = [plan_chunk(shape, i) for i in range(shape.num_chunks)]
    states = new_session_states(model, shape, context())
    run = PipelinedRun(model, states, shape, SEED, workers, plans)
    assert len(run.groups) == workers
    got = list(run)
    assert [i for i, _ in got] == list(range(4))
    want = generated(model, mode, 45)
    assert all(torch.equal(x, y) for (_, x), y in zip(got, want, strict=True))
    if mode == "histream-hiar" and workers == 2:
        # balanced by work: a low-res step (and its cache pass) is a quarter of a high-res one
        assert split_phases(plans[0], 2, shape) == [(0, 1, 2), (3,)]
        assert split_phases(plans[0], 2) == [(0, 1), (2, 3)]  # by cache count alone
    if mode == "hiar":
        assert split_phases(plans[0], 2, shape) == [(0, 1), (2, 3)]  # equal steps: even


def test_pipelines_that_cannot_be_built_are_refused():
    from histream_model.schedules import plan_chunk
    from histream_model.schedules.pipeline import split_phases

    hiar = plan_chunk(VideoShape(TINY, get_mode("hiar"), H, W, 33), 0)
    with pytest.raises(ValueError, match=r"workers=5 must be in \[1, 4\]"):
        split_phases(hiar, 5)
    drc = plan_chunk(VideoShape(TINY, get_mode("histream+"), H, W, 33), 0)
    with pytest.raises(ValueError, match="cannot be pipelined over these caches"):
        split_phases(drc, 2)  # KV_low is written after the high-res phase
