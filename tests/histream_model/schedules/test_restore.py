"""Rebuilding a session from latents: replaying every chunk's commits is bit-exact, replaying the
anchor and the last window is deterministic and close, and a decoder stream resumes from its
last latent frames."""

from __future__ import annotations

import pytest
import torch

from histream_model import PRESETS, build_dit, build_vae
from histream_model.config import Resolution, get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.schedules import new_session_states, plan_chunk, run_chunk, set_text
from histream_model.schedules.restore import (
    phase_after,
    position_after,
    reprefill,
    snapshot_chunks,
)
from histream_model.shape import VideoShape

BENCH = PRESETS["bench"]  # 4 layers: errors of a partial replay do not vanish as in `tiny`
H, W, FRAMES = 64, 96, 81  # 7 chunks


@pytest.fixture(scope="module")
def model():
    return build_dit(BENCH)


def context(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, BENCH.dit.text_len, BENCH.dit.text_dim, generator=g)


class Latents(list):
    """A generation's chunk latents, with the write inputs each chunk reported."""

    writes: dict[tuple[int, int], torch.Tensor]


def uninterrupted(model, mode: str, switch_at: int = 99) -> Latents:
    gen = HiStreamGenerator(model, BENCH, mode)
    state = gen.start(context(0), H, W, FRAMES, seed=3)
    out = Latents()
    out.writes = {}
    while not state.done:
        if state.next_chunk == switch_at:
            gen.set_prompt(state, context(1))
        chunk = gen.step(state)
        out.append(chunk.latents)
        out.writes |= {(chunk.index, i): x for i, x in chunk.write_inputs.items()}
    return out


def resumed(model, mode: str, full, done: int, keep: list[int], switch_at: int = 99):
    """Chunks `done`.. generated after a restore that replays the chunks in `keep`."""
    shape = VideoShape(BENCH, get_mode(mode), H, W, FRAMES)
    ctx = {0: context(0), 1: context(1)}

    def prompt_of(chunk: int) -> torch.Tensor:
        return ctx[1] if chunk >= switch_at else ctx[0]

    states = new_session_states(model, shape, prompt_of(done))
    latents = {k: full[k] for k in keep}
    writes = {key: x for key, x in full.writes.items() if key[0] in keep}
    for state in states.values():
        plans = lambda k: plan_chunk(shape, k)  # noqa: E731
        reprefill(model, state, shape, plans, latents, prompt_of, done, writes)
    set_text(model, states, prompt_of(done))
    return [run_chunk(model, states, shape, plan_chunk(shape, k), 3) for k in range(done, 7)]


def deviation(got, want) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


NEW_MODES = ["diagonal", "histream-diagonal", "hiar", "histream-hiar"]


@pytest.mark.parametrize("mode", ["histream+", "no-drc", *NEW_MODES])
def test_replaying_every_chunk_is_bit_exact(model, mode):
    full = uninterrupted(model, mode)
    assert deviation(resumed(model, mode, full, 4, [0, 1, 2, 3]), full[4:]) == 0


def test_a_session_with_every_chunk_in_restores_with_nothing_left_to_run(model):
    """A client that went away after the last chunk was decoded but before the session ended
    resumes it: its caches rebuild from every chunk (nothing is left to generate; the resume
    only replays what the client missed), never refused for a cache 'skipping back'."""
    full = uninterrupted(model, "histream+")
    assert resumed(model, "histream+", full, 7, list(range(7))) == []


@pytest.mark.parametrize("mode", NEW_MODES)
def test_a_restore_needs_the_reported_write_inputs(model, mode):
    """HiAR's and Diagonal's caches hold latents other than the chunks' outputs: a restore
    without them is refused, never silently rebuilt from the wrong latents."""
    full = uninterrupted(model, mode)
    assert full.writes  # every such chunk reported them
    full.writes = {}
    with pytest.raises(ValueError, match="a restore needs that write input"):
        resumed(model, mode, full, 4, [0, 1, 2, 3])


@pytest.mark.parametrize("mode", NEW_MODES)
def test_anchor_and_window_replay_is_close_in_every_new_mode(model, mode):
    full = uninterrupted(model, mode)
    keep = snapshot_chunks(4, anchor_chunks=1, window_chunks=2)
    scale = max(x.abs().max().item() for x in full[4:])
    assert deviation(resumed(model, mode, full, 4, keep), full[4:]) < 1e-2 * scale


def test_replaying_the_anchor_and_last_window_is_close_and_deterministic(model):
    full = uninterrupted(model, "histream+")
    keep = snapshot_chunks(4, anchor_chunks=1, window_chunks=2)
    assert keep == [0, 2, 3]
    first, second = (
        resumed(model, "histream+", full, 4, keep),
        resumed(model, "histream+", full, 4, keep),
    )
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # deterministic
    scale = max(x.abs().max().item() for x in full[4:])
    window2 = deviation(first, full[4:])
    window1 = deviation(resumed(model, "histream+", full, 4, [0, 3]), full[4:])
    anchor = deviation(resumed(model, "histream+", full, 4, [0]), full[4:])
    # each replayed chunk shrinks the error (one layer's worth of context per chunk)
    assert 0 < window2 < window1 / 5 < anchor / 5
    assert window2 < 1e-3 * scale


def test_a_restore_replays_each_chunk_under_its_own_prompt(model):
    full = uninterrupted(model, "histream+", switch_at=2)
    got = resumed(model, "histream+", full, 4, [0, 1, 2, 3], switch_at=2)
    assert deviation(got, full[4:]) == 0


def test_snapshot_chunks_keep_the_anchor_and_the_latest():
    assert snapshot_chunks(1, 1, 2) == [0]
    assert snapshot_chunks(3, 1, 2) == [0, 1, 2]
    assert snapshot_chunks(10, 1, 2) == [0, 8, 9]
    assert snapshot_chunks(10, 1, 0) == [0]


@pytest.mark.parametrize("mode", ["histream+", "no-drc", "histream-hiar"])
def test_position_after_is_the_last_phase_each_resolution_ran(mode):
    """Where a kept state stands after `done` chunks: what a resume compares it with before
    taking it up as is."""
    shape = VideoShape(BENCH, get_mode(mode), H, W, FRAMES)

    def plans(chunk: int):
        return plan_chunk(shape, chunk)

    for resolution in Resolution:
        ran = None  # walk the plans as a stage sees them, phase by phase
        for done in range(shape.num_chunks + 1):
            assert position_after(plans, resolution, done) == ran
            if done < shape.num_chunks:
                for index, phase in enumerate(plans(done).phases):
                    ran = (done, index) if phase.resolution == resolution else ran
    if mode == "no-drc":  # high resolution only: the low one never runs
        assert position_after(plans, Resolution.LOW, 4) is None


@pytest.mark.parametrize("mode", ["histream+", "no-drc", "histream-hiar"])
def test_phase_after_walks_each_resolutions_phases_in_order(mode):
    """The order a stage checks its phases against: every phase of a resolution, chunk by
    chunk, then None."""
    shape = VideoShape(BENCH, get_mode(mode), H, W, FRAMES)

    def plans(chunk: int):
        return plan_chunk(shape, chunk)

    for resolution in Resolution:
        walk = [
            (chunk, index)
            for chunk in range(shape.num_chunks)
            for index, phase in enumerate(plans(chunk).phases)
            if phase.resolution == resolution
        ]
        position, seen = None, []
        while (position := phase_after(plans, resolution, position, shape.num_chunks)) is not None:
            seen.append(position)
        assert seen == walk
        if walk:  # after a restore at `done` chunks, the next is chunk done's first phase
            done = 3
            after = position_after(plans, resolution, done)
            assert phase_after(plans, resolution, after, shape.num_chunks)[0] == done


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_a_decoder_stream_resumes_from_its_last_latent_frames(preset):
    torch.manual_seed(0)
    vae = build_vae(PRESETS[preset].vae)
    z = torch.randn(1, 16, 45, 4, 6)
    state, frames = vae.new_decode_state(), []
    for i in range(0, 45, 3):
        out, state = vae.decode_chunk(z[:, :, i : i + 3], state)
        frames.append(out)
    want = torch.cat(frames[12:], dim=2)  # after 36 latent frames

    def resume(tail: int) -> torch.Tensor:
        resumed_state = vae.resume_decode_state(z[:, :, 36 - tail : 36], 36 - tail)
        out = []
        for i in range(36, 45, 3):
            chunk, resumed_state = vae.decode_chunk(z[:, :, i : i + 3], resumed_state)
            out.append(chunk)
        return torch.cat(out, dim=2)

    assert torch.equal(resume(36), want)  # the whole stream: exact
    errors = {k: (resume(k) - want).abs().max().item() for k in (8, 16, 24)}
    assert errors[8] > errors[16] > errors[24]
    assert errors[24] < 1 / 255  # below one step of 8-bit video
