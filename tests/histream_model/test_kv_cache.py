"""KV caches: chunked attention through the cache equals one masked pass; sizes; ordering."""

from __future__ import annotations

import pytest
import torch

from histream_model import build_dit
from histream_model.config import DiTConfig, HiStreamOptions
from histream_model.kv_cache import CacheLayout, KVCache
from histream_model.rope import RopeAxes

CONFIG = DiTConfig(
    dim=24, ffn_dim=32, freq_dim=32, num_heads=2, num_layers=2, text_dim=16, text_len=8
)
HW = (4, 6)  # latent grid -> 2 x 3 = 6 tokens per frame


def frame_mask(frames: int, chunk: int, anchor: int | None, window: int | None) -> torch.Tensor:
    """What frame i may see, defined directly: its own chunk, and earlier frames that are either
    in the anchor or among the `window` frames just before its chunk (None = all of them)."""
    mask = torch.zeros(frames, frames, dtype=torch.bool)
    for i in range(frames):
        start = (i // chunk) * chunk
        for j in range(frames):
            if start <= j < start + chunk:
                mask[i, j] = True
            elif j < start:
                in_anchor = anchor is None or j < anchor
                in_window = window is None or j >= start - window
                mask[i, j] = in_anchor or in_window if anchor is not None else True
    return mask


def run_chunked(model, cache, x, t, context, chunk, axes) -> torch.Tensor:
    text = model.text_kv(context)
    outs = []
    for c in range(x.shape[2] // chunk):
        sl = slice(c * chunk, (c + 1) * chunk)
        slots = cache.slots(c * chunk, chunk)
        rope = model.chunk_rope(axes, slots, HW)
        outs.append(model.forward_chunk(x[:, :, sl], t[:, sl][:, 0], text, cache, slots, rope))
        cache.commit(slots)
    return torch.cat(outs, dim=2)


@pytest.fixture(scope="module")
def model():
    return build_dit(CONFIG)


def sequence(frames: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, frames, *HW, generator=g)
    # one timestep per chunk, different chunks at different noise levels
    t = torch.tensor([[937.5] * 3 + [625.0] * 3 + [250.0] * 3 + [0.0] * 3 + [500.0] * 3])[
        :, :frames
    ]
    context = torch.randn(1, 8, 16, generator=g)
    return x, t, context


@torch.no_grad()
def test_full_history_cache_equals_block_causal_pass(model):
    x, t, context = sequence(15)
    axes = RopeAxes.build(CONFIG)
    cache = KVCache(CacheLayout.full_history(15, 6), CONFIG)
    chunked = run_chunked(model, cache, x, t, context, 3, axes)
    one_pass = model.forward_full(x, t, context, frame_mask=frame_mask(15, 3, None, None))
    torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-5)
    # and the mask matters: without it the result differs
    unmasked = model.forward_full(x, t, context)
    assert (unmasked - one_pass).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("anchor", "window", "chunk"),
    [(1, 2, 3), (3, 1, 3), (0, 3, 3), (2, 4, 3)],
)
@torch.no_grad()
def test_sliding_window_cache_equals_windowed_mask(model, anchor, window, chunk):
    frames = 15
    x, t, context = sequence(frames)
    axes = RopeAxes.build(CONFIG)
    options = HiStreamOptions(chunk_frames=chunk, anchor_frames=anchor, window_frames=window)
    cache = KVCache(CacheLayout.sliding_window(options, 6), CONFIG)
    chunked = run_chunked(model, cache, x, t, context, chunk, axes)
    one_pass = model.forward_full(
        x, t, context, frame_mask=frame_mask(frames, chunk, anchor, window)
    )
    torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-5)


def test_sliding_window_drops_middle_frames(model):
    """The windowed result must differ from full history once frames fall out of the window."""
    x, t, context = sequence(15)
    axes = RopeAxes.build(CONFIG)
    with torch.no_grad():
        window = run_chunked(
            model,
            KVCache(CacheLayout.sliding_window(HiStreamOptions(), 6), CONFIG),
            x,
            t,
            context,
            3,
            axes,
        )
        full = run_chunked(
            model, KVCache(CacheLayout.full_history(15, 6), CONFIG), x, t, context, 3, axes
        )
    torch.testing.assert_close(window[:, :, :6], full[:, :, :6], rtol=0, atol=0)  # chunks 1-2
    assert (window[:, :, 6:] - full[:, :, 6:]).abs().max() > 1e-4  # chunk 3 lost frame 3


def test_layout_holds_anchor_window_and_chunk():
    layout = CacheLayout.sliding_window(HiStreamOptions(), tokens_per_frame=1)
    for end in range(3, 40, 3):
        held = {}
        for f in range(end):  # later frames overwrite earlier ones in the same slot
            held[layout.slot(f)] = f
        prefix = layout.context_frames(end)
        visible = sorted(f for s, f in held.items() if s < prefix)
        expected = sorted({0} | set(range(max(0, end - 5), end)))
        assert visible == expected, (end, visible)


def test_bytes_are_exact_and_window_size_is_length_independent():
    options = HiStreamOptions()
    elem = torch.finfo(torch.float32).bits // 8
    per_frame = 2 * CONFIG.num_layers * 6 * CONFIG.num_heads * CONFIG.head_dim * elem
    window = KVCache(CacheLayout.sliding_window(options, 6), CONFIG)
    assert window.nbytes == per_frame * (1 + 2 + 3)
    for frames in (21, 42, 210):
        full = KVCache(CacheLayout.full_history(frames, 6), CONFIG)
        assert full.nbytes == per_frame * frames


def test_chunks_must_arrive_in_order():
    cache = KVCache(CacheLayout.sliding_window(HiStreamOptions(), 6), CONFIG)
    with pytest.raises(ValueError, match="starts at latent frame 3 but the cache has 0"):
        cache.slots(3, 3)
    full = KVCache(CacheLayout.full_history(6, 6), CONFIG)
    full.commit(full.slots(0, 3))
    full.commit(full.slots(3, 3))
    with pytest.raises(ValueError, match="past the end"):
        full.slots(6, 3)


def test_the_window_slides_in_place_and_the_attended_context_is_a_view():
    """BENCHMARKS *Where the time goes*: the ring buffer is written in place (no reallocation
    as the window slides) and what a chunk attends to is a view of it (no copy)."""
    cache = KVCache(CacheLayout.sliding_window(HiStreamOptions(), 6), CONFIG)
    k_storage, v_storage = cache.k.data_ptr(), cache.v.data_ptr()
    shape = (1, 18, CONFIG.num_heads, CONFIG.head_dim)
    for chunk in range(6):  # past the ring's capacity: the window wraps
        slots = cache.slots(chunk * 3, 3)
        for layer in range(CONFIG.num_layers):
            cache.write(layer, torch.randn(shape), torch.randn(shape), slots)
            k, v = cache.context(layer, slots)
            assert k._base is cache.k and v._base is cache.v  # views of the buffers
            assert k.data_ptr() == cache.k[layer].data_ptr()
        cache.commit(slots)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_storage, v_storage)


@pytest.mark.parametrize("mode", ["histream+", "self-forcing"])
def test_text_kv_is_computed_once_per_session_and_resolution_never_per_chunk(mode, monkeypatch):
    """BENCHMARKS *Where the time goes*: the cross-attention K/V of the prompt are computed when
    a session starts and again only for a new prompt, never per chunk. In process the session's
    resolutions share them (once per session); in the service each denoising stage holds one
    resolution and computes them once for it."""
    from histream_model.components import load_components
    from histream_model.generator import HiStreamGenerator

    c = load_components("tiny", device="cpu")
    calls = []
    real = c.dit.text_kv
    monkeypatch.setattr(c.dit, "text_kv", lambda context: calls.append(1) or real(context))
    gen = HiStreamGenerator(c.dit, c.preset, mode)
    state = gen.start(c.text.encode(["a cat"]), 64, 96, 57)
    assert len(state.states) == (2 if mode == "histream+" else 1)
    assert len({id(s.text) for s in state.states.values()}) == 1  # shared
    assert len(calls) == 1
    gen.step(state)
    gen.step(state)
    assert len(calls) == 1  # none for the chunks
    gen.set_prompt(state, c.text.encode(["a dog"]))
    while not state.done:
        gen.step(state)
    assert len(calls) == 2  # once more for the new prompt, not per chunk
