"""Wan2.1 DiT with the original key names, per-frame timesteps and an explicit KV cache.

Two entry points share every layer:
- `forward_full(x, t, context)`: the whole clip at once, bidirectional, no cache; exactly what
  Wan2.1's WanModel computes (optionally with per-frame t and a block-causal mask).
- `forward_chunk(...)`: one chunk of an autoregressive video against a `KVCache` the caller owns,
  with absolute frame positions, the chunk's text K/V computed once per session (`text_kv`), and a
  softmax scale for CineScale attention scaling.
The model holds weights only: one instance serves any number of sessions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from histream_model.config import DiTConfig
from histream_model.dit_attention import (
    CachedRow,
    CrossAttention,
    SelfAttention,
    SelfAttnContext,
    TextKV,
)
from histream_model.kv_cache import ChunkSlots, KVCache
from histream_model.rope import RopeAxes, RopeTable, rope_table

__all__ = ["CachedRow", "SelfAttnContext", "TextKV", "WanDiT", "build_dit"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class Block(nn.Module):
    """Self-attention, text cross-attention and FFN, each modulated by the timestep."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config)
        self.norm3 = LayerNorm(dim, config.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, dim),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulate(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """e0 [B, Fe, 6, dim] -> six [B, Fe, 1, dim] (shift/scale/gate for attention and FFN)."""
        return (self.modulation.unsqueeze(1).float() + e0).chunk(6, dim=2)

    def pre_attention(
        self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], frames: int
    ) -> torch.Tensor:
        """Modulated input of self-attention, tokens flattened: [B, L, dim]."""
        h = self.norm1(x).float().unflatten(1, (frames, -1))  # (B, F, S, dim)
        return (h * (1 + mod[1]) + mod[0]).flatten(1, 2).type_as(x)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
        layer: int,
        ctx: SelfAttnContext,
        frames: int,
    ) -> torch.Tensor:
        mod = self.modulate(e0)
        y = self.self_attn(self.pre_attention(x, mod, frames), layer, ctx)
        x = x + (y.float().unflatten(1, (frames, -1)) * mod[2]).flatten(1, 2).type_as(x)
        x = x + self.cross_attn(self.norm3(x), *text)
        h = self.norm2(x).float().unflatten(1, (frames, -1))
        y = self.ffn((h * (1 + mod[4]) + mod[3]).flatten(1, 2).type_as(x))
        return x + (y.float().unflatten(1, (frames, -1)) * mod[5]).flatten(1, 2).type_as(x)


class Head(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.out_dim * config.patch_volume)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, L, dim], e [B, Fe, dim] -> [B, L, out_dim * patch_volume]."""
        shift, scale = (self.modulation.unsqueeze(1).float() + e.unsqueeze(2)).chunk(2, dim=2)
        h = self.norm(x).float().unflatten(1, (frames, -1))  # (B, F, S, dim)
        return self.head((h * (1 + scale) + shift).flatten(1, 2).type_as(x))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding in float64: cat[cos, sin] of t * 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class WanDiT(nn.Module):
    """The Wan2.1 text-to-video DiT; state-dict keys match the original WanModel."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.head = Head(config)

    # -- pieces shared by both entry points ------------------------------------------------------

    def text_kv(self, context: torch.Tensor) -> TextKV:
        """Cross-attention K/V for a padded text context [B, text_len, text_dim]."""
        text = self.text_embedding(context.to(self.patch_embedding.weight.dtype))
        pairs = [block.cross_attn.keys_values(text) for block in self.blocks]
        return TextKV(k=tuple(k for k, _ in pairs), v=tuple(v for _, v in pairs))

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, Fe] -> e [B, Fe, dim] and e0 [B, Fe, 6, dim], in float32."""
        b, fe = t.shape
        sin = sinusoidal_embedding(t.flatten(), self.config.freq_dim)
        e = self.time_embedding(sin.to(self.time_embedding[0].weight.dtype)).float()
        projection = self.time_projection[1].weight.dtype
        e0 = self.time_projection(e.to(projection)).float().unflatten(1, (6, -1))
        return e.unflatten(0, (b, fe)), e0.unflatten(0, (b, fe))

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C, F, H, W] -> tokens [B, L, dim] and the token grid (F', H', W')."""
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        return h.flatten(2).transpose(1, 2).contiguous(), tuple(h.shape[2:])  # type: ignore[return-value]

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, C * pt * ph * pw] -> [B, C, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return out.reshape(out.shape[0], out.shape[1], f * pt, h * ph, w * pw)

    def _frame_timesteps(self, t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.patch_embedding.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            return t[:, None]  # (B, 1): one timestep for every frame
        if t.shape != (batch, frames):
            raise ValueError(
                f"per-frame timesteps must be [B, F]=[{batch}, {frames}], got {list(t.shape)}"
            )
        return t

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextKV,
        ctx_for_grid: Callable[[tuple[int, int, int]], SelfAttnContext],
        kv_only: bool = False,
        per_row: bool = False,
    ) -> torch.Tensor | None:
        if per_row:  # the 3D conv's result depends on the batch size: one row at a time
            patches = [self.patchify(x[i : i + 1]) for i in range(x.shape[0])]
            tokens, grid = torch.cat([p for p, _ in patches]), patches[0][1]
        else:
            tokens, grid = self.patchify(x)
        frames = grid[0]
        e, e0 = self.embed_time(self._frame_timesteps(t, x.shape[0], frames))
        ctx: SelfAttnContext = ctx_for_grid(grid)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if kv_only and i == last:
                # Only this layer's keys/values are needed: skip its attention, FFN and the head.
                h = block.pre_attention(tokens, block.modulate(e0), frames)
                block.self_attn.write(h, i, ctx)
                return None
            tokens = block(tokens, e0, (text.k[i], text.v[i]), i, ctx, frames)
        return self.unpatchify(self.head(tokens, e, frames).float(), grid)

    # -- entry points ----------------------------------------------------------------------------

    def forward_full(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        rope: RopeAxes | None = None,
        frame_offset: int = 0,
        frame_positions: Sequence[int] | None = None,
        frame_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Flow prediction for a whole clip x [B, C, F, H, W] with no cache.

        t is [B] (Wan2.1) or [B, F] per latent frame, in [0, 1000]; context [B, text_len,
        text_dim] already padded. `frame_mask` [F, F] (True = frame i may attend to frame j)
        restricts attention, e.g. to the causal model's block-causal pattern. Frames sit at
        positions frame_offset, frame_offset + 1, ..., or at `frame_positions` (teacher forcing
        with an anchor frame and a later window, as the sliding-window cache lays them out).
        """
        rope = rope or RopeAxes.build(self.config)

        def ctx_for_grid(grid: tuple[int, int, int]) -> SelfAttnContext:
            mask = None
            if frame_mask is not None:
                per_frame = grid[1] * grid[2]
                mask = frame_mask.to(x.device).repeat_interleave(per_frame, 0)
                mask = mask.repeat_interleave(per_frame, 1)  # (Lq, Lk)
            return SelfAttnContext(
                rope=rope_table(rope, frame_offset, grid, x.device, frame_positions),
                scale=scale,
                mask=mask,
            )

        out = self._run(x, t, self.text_kv(context), ctx_for_grid)
        assert out is not None
        return out

    def forward_chunk(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextKV,
        cache: KVCache,
        slots: ChunkSlots,
        rope: RopeTable,
        scale: float | None = None,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """One autoregressive pass over a chunk x [B, C, M, H, W] against its cache.

        The chunk's keys/values are written into its slots and it attends to the cache's context
        (history + itself). With `kv_only` (the t = 0 commit pass) nothing is returned and the
        work after the last layer's keys/values is skipped.
        """
        ctx = SelfAttnContext(rope=rope, scale=scale, cache=cache, slots=slots)
        return self._run(x, t, text, lambda grid: ctx, kv_only=kv_only)

    def forward_chunk_rows(
        self,
        x: torch.Tensor,
        t: float,
        text: TextKV,
        rows: Sequence[CachedRow],
        scale: float | None = None,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """`forward_chunk` of several sessions at once: row i of x [N, C, M, H, W] and of
        `text` is session i, which uses `rows[i]` (its cache, slots, RoPE table); every row is
        at timestep `t`. Each row's result equals its own `forward_chunk`: the timestep
        embedding is computed once as for a batch of 1, attention runs per row, and the rest
        works row by row inside each kernel (bit for bit on the CPU, where it is tested)."""
        if len(rows) != x.shape[0] or text.k[0].shape[0] != x.shape[0]:
            raise ValueError(
                f"{x.shape[0]} latent rows, {text.k[0].shape[0]} text rows and {len(rows)} "
                "sessions must agree"
            )
        ctx = SelfAttnContext(rope=None, scale=scale, rows=tuple(rows))
        t_one = torch.full((1,), t, device=x.device)
        return self._run(x, t_one, text, lambda grid: ctx, kv_only=kv_only, per_row=True)

    def chunk_rope(
        self, axes: RopeAxes, slots: ChunkSlots, latent_hw: tuple[int, int]
    ) -> RopeTable:
        """Rotation table of a chunk's tokens at absolute frame positions."""
        _, ph, pw = self.config.patch_size
        grid = (slots.num_frames, latent_hw[0] // ph, latent_hw[1] // pw)
        return rope_table(axes, slots.frame_start, grid, self.patch_embedding.weight.device)


def build_dit(
    preset_or_config: object,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> WanDiT:
    """A randomly initialised DiT for a preset name, a `Preset` or a `DiTConfig`.

    device="meta" builds the structure without memory (for counting parameters or loading).
    """
    from histream_model.config import Preset, get_preset

    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config).dit
    elif isinstance(preset_or_config, Preset):
        config = preset_or_config.dit
    elif isinstance(preset_or_config, DiTConfig):
        config = preset_or_config
    else:
        raise TypeError(
            f"expected a preset name, Preset or DiTConfig, got {type(preset_or_config)}"
        )
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = WanDiT(config)
    _init_weights(model)
    return model.to(dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def _init_weights(model: WanDiT) -> None:
    """Small random weights with every parameter non-trivial (norm scales included)."""
    if model.patch_embedding.weight.is_meta:
        return
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.02)
        elif p.ndim >= 2 and "modulation" not in name:
            fan_in = math.prod(p.shape[1:])
            nn.init.normal_(p, std=1.0 / math.sqrt(fan_in))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
