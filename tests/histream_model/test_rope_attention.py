"""RoPE (rope.py) and the attention wrapper (attention.py) against formulas written here: the
Wan2.1 3D split and frequencies, NTK scaling of theta, relative positions, the complex-multiply
rotation equal bit for bit to real arithmetic (BENCHMARKS, *Speed work*), masks and CineScale's
softmax scale."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from histream_model import PRESETS
from histream_model.attention import attention, backend_for, scaled_softmax_scale
from histream_model.rope import RopeAxes, apply_rope, rope_table

CONFIG = PRESETS["tiny"].dit  # head_dim 32: rope dims (frame, height, width)


def test_frequencies_are_wans_with_theta_scaled_per_axis():
    d_frame, d_height, d_width = CONFIG.rope_dims
    assert d_frame + d_height + d_width == CONFIG.head_dim
    assert d_height == d_width == 2 * (CONFIG.head_dim // 6)  # Wan2.1: 128 -> 44/42/42
    axes = RopeAxes.build(CONFIG, (1.0, 2.0, 5.0))
    for got, dim, factor in ((axes.frame, d_frame, 1.0), (axes.height, d_height, 2.0),
                             (axes.width, d_width, 5.0)):  # fmt: skip
        want = [(CONFIG.rope_theta * factor) ** (-2 * i / dim) for i in range(dim // 2)]
        assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert axes.height[1] < RopeAxes.build(CONFIG).height[1]  # NTK: slower rotations


def _rotate_real(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32."""
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_a_token_is_rotated_by_its_frame_row_and_column():
    axes = RopeAxes.build(CONFIG, (1.0, 2.0, 2.0))
    grid = (2, 3, 4)
    table = rope_table(axes, 7, grid)  # frames 7 and 8
    x = torch.randn(1, 24, 1, CONFIG.head_dim, generator=torch.Generator().manual_seed(0))
    out = apply_rope(x, table)
    for token, (f, h, w) in enumerate((f, h, w) for f in range(2) for h in range(3)
                                      for w in range(4)):  # fmt: skip
        angles = torch.cat([(7 + f) * axes.frame, h * axes.height, w * axes.width])
        torch.testing.assert_close(out[0, token, 0], _rotate_real(x[0, token, 0], angles),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_the_complex_rotation_is_bit_identical_to_real_arithmetic_on_the_same_table():
    table = rope_table(RopeAxes.build(CONFIG), 3, (3, 4, 6))
    x = torch.randn(2, 72, 2, CONFIG.head_dim, generator=torch.Generator().manual_seed(1))
    cos, sin = table.rotations.real, table.rotations.imag  # (L, 1, D/2), float32
    a, b = x[..., 0::2], x[..., 1::2]
    real = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    assert torch.equal(apply_rope(x, table), real)


def test_attention_scores_depend_only_on_relative_positions():
    """Keys rotated at their absolute frame keep their meaning wherever a cache lays them out."""
    axes = RopeAxes.build(CONFIG, (1.0, 2.0, 2.0))
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 12, 1, CONFIG.head_dim, generator=g) for _ in range(2))

    def scores(start: int) -> torch.Tensor:
        table = rope_table(axes, start, (1, 3, 4))
        return torch.einsum("bqhd,bkhd->qk", apply_rope(q, table), apply_rope(k, table))

    torch.testing.assert_close(scores(0), scores(250), rtol=1e-4, atol=1e-4)
    moved = rope_table(axes, 0, (2, 3, 4), frame_positions=[0, 40])
    assert not torch.allclose(moved.rotations[:12], moved.rotations[12:])


def test_frame_positions_must_match_the_grid():
    with pytest.raises(ValueError, match="3 frame positions for a grid of 2 frames"):
        rope_table(RopeAxes.build(CONFIG), 0, (2, 1, 1), frame_positions=[0, 1, 2])


def test_attention_is_softmax_attention_with_its_mask_and_scale():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[j <= i for j in range(5)] for i in range(5)])  # True: may attend
    assert backend_for(q, mask) == "sdpa"  # the CPU path
    for scale in (None, 0.2):
        s = 1 / math.sqrt(8) if scale is None else scale
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * s
        logits = logits.masked_fill(~mask, float("-inf"))
        want = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
        torch.testing.assert_close(attention(q, k, v, scale, mask), want, rtol=1e-5, atol=1e-5)


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: only for which kernel `attention` picks."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_flash_attn_is_picked_on_cuda_in_fp16_and_bf16_when_importable(monkeypatch):
    """README, *Real weights*: flash-attn is used automatically on CUDA in fp16/bf16, torch
    SDPA otherwise. What is checked here is the choice and the call (layout [B, L, H, D] as
    flash_attn_func takes it, the softmax scale); the kernel itself runs only on a GPU."""
    import types

    from histream_model import attention as module

    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None):
        calls.append((tuple(q.shape), q.dtype, softmax_scale))
        return torch.zeros_like(q.as_subclass(torch.Tensor))

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 5, 2, 8, generator=g)
    mask = torch.ones(5, 5, dtype=torch.bool)
    module._flash_attn.cache_clear()
    if importlib.util.find_spec("flash_attn") is None:  # not installed (no `gpu` extra)
        assert backend_for(q.bfloat16().as_subclass(OnCuda)) == "sdpa"
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    module._flash_attn.cache_clear()
    try:
        for dtype in (torch.float16, torch.bfloat16):
            on_cuda = q.to(dtype).as_subclass(OnCuda)
            assert backend_for(on_cuda) == "flash-attn"
            out = attention(on_cuda, on_cuda, on_cuda, 0.2)
            assert calls[-1] == ((1, 5, 2, 8), dtype, 0.2) and not out.any()
        assert backend_for(q.as_subclass(OnCuda)) == "sdpa"  # fp32
        assert backend_for(q.bfloat16().as_subclass(OnCuda), mask) == "sdpa"  # a mask
        assert backend_for(q.bfloat16()) == "sdpa"  # on the CPU
        assert len(calls) == 2
    finally:
        monkeypatch.undo()
        module._flash_attn.cache_clear()


def test_cinescales_scale_is_log_n_c_over_log_n():
    assert scaled_softmax_scale(64, 1.0, 1020) == pytest.approx(1 / 8)  # c = 1: plain 1/sqrt(d)
    assert scaled_softmax_scale(128, 2.0, 2040) == pytest.approx(
        math.log(4080) / math.log(2040) / math.sqrt(128)
    )
    with pytest.raises(ValueError, match="reference_tokens=1 must be >= 2"):
        scaled_softmax_scale(64, 2.0, 1)
    with pytest.raises(ValueError, match="factor=0 must be > 0"):
        scaled_softmax_scale(64, 0, 100)
