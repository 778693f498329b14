"""The FLOP and memory model against hand-computed values, torch's FLOP counter and the caches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from histream_model import MODES, PRESETS, build_dit
from histream_model import dit_attention as dit_module
from histream_model.config import DiTConfig, HiStreamOptions, get_mode
from histream_model.flops import (
    cache_layout,
    chunk_flops,
    chunk_passes,
    dit_parameters,
    kv_bytes,
    pass_flops,
    pass_terms,
    session_bytes,
    text_kv_flops,
    video_flops,
)
from histream_model.generator import HiStreamGenerator
from histream_model.kv_cache import CacheLayout, KVCache
from histream_model.shape import VideoShape

TINY = PRESETS["tiny"]
H, W, FRAMES = 64, 96, 33  # 4 x 6 low-res and 8 x 12 high-res latents, 9 latent frames, 3 chunks
SMALL = DiTConfig(
    dim=8, ffn_dim=16, freq_dim=4, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
    text_dim=6, text_len=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build_dit(TINY)


def context() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, TINY.dit.text_len, TINY.dit.text_dim, generator=g)


def test_pass_terms_by_hand():
    # d = 8, f = 16, Lq = 5, Lk = 10, Lt = 3, 2 layers, 4 channels x patch 1*2*2 = 16 in and out
    terms = pass_terms(SMALL, query_tokens=5, key_tokens=10)
    assert terms == {
        "self_proj": 2 * 8 * 5 * 8 * 8,  # 5120
        "self_attn": 2 * 4 * 5 * 10 * 8,  # 3200
        "cross_proj": 2 * 4 * 5 * 8 * 8,  # 2560
        "cross_attn": 2 * 4 * 5 * 3 * 8,  # 960
        "ffn": 2 * 4 * 5 * 8 * 16,  # 5120
        "embed": 2 * 5 * 16 * 8 + 2 * (4 * 8 + 8 * 8 + 6 * 8 * 8),  # 1280 + 960
        "head": 2 * 5 * 8 * 16,  # 1280
    }
    assert pass_flops(SMALL, 5, 10) == 20480
    # commit pass: block 0 in full, block 1's k and v projections only, no head
    commit = pass_terms(SMALL, 5, 10, kv_only=True)
    assert commit["self_proj"] == 8 * 5 * 64 + 4 * 5 * 64
    assert (commit["self_attn"], commit["ffn"], commit["head"]) == (1600, 2560, 0)
    assert pass_flops(SMALL, 5, 10, kv_only=True) == 12000
    assert pass_flops(SMALL, 5, 10, text_tokens=6) == 20480 + 960
    # text K/V once per prompt: embedding 2*3*(6*8 + 8*8), k and v of 2 layers 2*4*3*8*8
    assert text_kv_flops(SMALL) == 672 + 1536


def test_key_lengths_follow_the_window():
    shape = VideoShape(PRESETS["bench"], get_mode("histream"), 384, 640, 81)
    high, low = 960, 240  # tokens per latent frame: 24 x 40 and 12 x 20
    keys = [
        [(p.resolution, p.kind, p.key_tokens) for p in chunk_passes(shape, i)] for i in (0, 1, 6)
    ]
    assert keys[0] == [("low", "denoise", 3 * low)] * 2 + [("high", "denoise", 3 * high)] * 2 + [
        ("high", "commit", 3 * high),
        ("low", "commit", 3 * low),
    ]
    assert {k for _, _, k in keys[1]} == {6 * low, 6 * high}
    assert keys[2] == keys[1]  # anchor 1 + window 2 + chunk 3: 6 frames from chunk 2 on
    full = VideoShape(PRESETS["bench"], get_mode("self-forcing"), 384, 640, 81)
    assert [p.key_tokens for p in chunk_passes(full, 6)] == [21 * high] * 5
    assert chunk_flops(full, 0) == {
        ("high", "denoise"): 4 * pass_flops(full.preset.dit, 3 * high, 3 * high),
        ("high", "commit"): pass_flops(full.preset.dit, 3 * high, 3 * high, kv_only=True),
    }


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@pytest.mark.parametrize("mode", list(MODES))
def test_model_equals_torch_flop_counter_on_a_real_generation(model, mode):
    gen = HiStreamGenerator(model, TINY, mode)
    state = gen.start(context(), H, W, FRAMES)
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={cpu_flash: _cpu_sdpa}) as counter:
        while not state.done:
            gen.step(state)
    assert counter.get_total_flops() == video_flops(TINY, mode, H, W, FRAMES).total


@pytest.mark.parametrize("mode", list(MODES))
def test_attention_calls_match_the_modelled_key_lengths(model, mode, monkeypatch):
    calls: list[tuple[int, int]] = []
    real = dit_module.attention

    def recording(q, k, v, scale=None, mask=None):
        calls.append((q.shape[1], k.shape[1]))
        return real(q, k, v, scale=scale, mask=mask)

    monkeypatch.setattr(dit_module, "attention", recording)
    gen = HiStreamGenerator(model, TINY, mode)
    state = gen.start(context(), H, W, FRAMES)
    while not state.done:
        gen.step(state)
    shape = state.shape
    expected = []
    for i in range(shape.num_chunks):
        for p in chunk_passes(shape, i):
            layers = TINY.dit.num_layers - (p.kind == "commit")  # a commit's last layer: k, v only
            expected += [
                (p.query_tokens, p.key_tokens),
                (p.query_tokens, TINY.dit.text_len),
            ] * layers
    assert calls == expected


@pytest.mark.parametrize(
    "layout",
    [
        CacheLayout.sliding_window(HiStreamOptions(), tokens_per_frame=6),
        CacheLayout.sliding_window(HiStreamOptions(anchor_frames=3, window_frames=4), 35),
        CacheLayout.full_history(21, 6),
        CacheLayout.full_history(210, 2),
    ],
)
@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_bytes_equal_the_allocated_cache(layout, dtype, size):
    for batch in (1, 2):
        cache = KVCache(layout, SMALL, batch=batch, dtype=dtype)
        assert kv_bytes(SMALL, layout, batch, size) == cache.nbytes


@pytest.mark.parametrize("mode", ["histream+", "no-agsw", "self-forcing", "hiar", "histream-hiar"])
def test_session_bytes_equal_a_started_session(model, mode):
    state = HiStreamGenerator(model, TINY, mode).start(context(), H, W, FRAMES)
    held = session_bytes(TINY, mode, H, W, FRAMES)
    caches = state.kv_bytes()
    assert (held["kv_low"], held["kv_high"]) == (caches["low"], caches["high"])
    # one text K/V per resolution (what each stage holds; its caches share it)
    assert held["text_kv"] == state.text_bytes() * len(state.shape.mode.resolutions)
    high = [s for s in state.states.values() if s.resolution == "high"]
    assert all(cache_layout(state.shape, "high") == s.cache.layout for s in high)


def test_agsw_bytes_are_length_independent_and_full_history_linear():
    preset = PRESETS["wan2.1-1.3b"]

    def held(mode: str, latent_frames: int) -> dict[str, int]:
        return session_bytes(preset, mode, 1088, 1920, 1 + 4 * (latent_frames - 1), 2)

    assert held("histream", 21) == held("histream", 210)
    assert held("no-agsw", 210)["kv_high"] == 10 * held("no-agsw", 21)["kv_high"]
    # AGSW at 1080p in bf16: 6 frames x 8160 tokens x 1536 x 2 (k, v) x 30 layers x 2 bytes
    assert held("histream", 21)["kv_high"] == 6 * 8160 * 1536 * 2 * 30 * 2
    assert held("histream", 21)["kv_low"] == 6 * 2040 * 1536 * 2 * 30 * 2
    # HiAR: a cache per step, each under AGSW, so flat in length too
    for mode in ("diagonal", "histream-diagonal", "hiar", "histream-hiar"):
        assert held(mode, 21) == held(mode, 210)
    assert held("hiar", 21)["kv_high"] == 4 * held("histream", 21)["kv_high"]
    assert held("histream-hiar", 21)["kv_low"] == 2 * held("histream", 21)["kv_low"]
    assert held("histream-hiar", 21)["kv_high"] == 2 * held("histream", 21)["kv_high"]


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_parameter_count_matches_the_module(preset):
    built = build_dit(preset.dit, device="meta")
    assert dit_parameters(preset.dit) == sum(p.numel() for p in built.parameters())


def test_1080p_speedups_are_those_of_the_flop_model():
    preset = PRESETS["wan2.1-1.3b"]
    per_frame = {m: video_flops(preset, m, 1088, 1920, 81).per_frame for m in MODES}
    # self-forcing: 4 steps + commit at 8160 tokens/frame over a growing full history
    assert per_frame["self-forcing"] == pytest.approx(216.9e12, rel=1e-3)
    order = ["self-forcing", "hiar", "no-agsw", "no-drc", "histream-hiar", "histream",
             "diagonal", "histream+", "naive-2step", "histream-diagonal"]  # fmt: skip
    assert [per_frame[m] for m in order] == sorted(per_frame.values(), reverse=True)
    # Diagonal context on HiStream+ (no KV_high commit after chunk 1): ~31 TFLOP/frame + the
    # KV_low commit of Down(x0)
    assert per_frame["histream-diagonal"] == pytest.approx(32.6e12, rel=2e-3)
    with pytest.raises(ValueError, match="height=1080"):
        video_flops(preset, "histream", 1080, 1920, 81)
    wider = replace(preset, options=replace(preset.options, window_frames=30))
    # a window covering the whole video is full history
    wide = video_flops(wider, "histream", 1088, 1920, 81)
    assert wide.total == video_flops(preset, "no-agsw", 1088, 1920, 81).total
