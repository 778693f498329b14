"""The DiT's attention layers and what a pass tells them: q/k/v projections with RMS-normed
queries and keys, self-attention against a session's KV cache (or, for a cross-session batch,
each row against its own), text cross-attention, and the contexts that carry RoPE tables,
caches and masks into a pass. Parameter names are those of Wan2.1's WanModel blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from histream_model.attention import attention
from histream_model.config import DiTConfig
from histream_model.kv_cache import ChunkSlots, KVCache
from histream_model.rope import RopeTable, apply_rope


@dataclass(frozen=True)
class TextKV:
    """Cross-attention keys/values of one prompt for every layer, computed once per prompt."""

    k: tuple[torch.Tensor, ...]  # per layer (B, text_len, H, D)
    v: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))


@dataclass(frozen=True)
class CachedRow:
    """One session of a cross-session batched pass: batch row i of the pass uses its own cache,
    slots and RoPE table (its own frame positions)."""

    cache: KVCache
    slots: ChunkSlots
    rope: RopeTable


@dataclass(frozen=True)
class SelfAttnContext:
    """How self-attention sees its keys for one forward pass."""

    rope: RopeTable | None  # rotation of this pass's tokens (None: per row, see `rows`)
    scale: float | None = None  # softmax scale (None = 1/sqrt(head_dim))
    cache: KVCache | None = None  # None: attend within the pass only
    slots: ChunkSlots | None = None  # where the pass's tokens live in `cache`
    mask: torch.Tensor | None = None  # boolean [L, L] (cache-less passes only)
    rows: tuple[CachedRow, ...] | None = None  # a cross-session batch: one per batch row


class RMSNorm(nn.Module):
    """RMS norm over the full hidden size (across heads), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


class Projections(nn.Module):
    """q/k/v/o projections with RMS-normed queries and keys (both attentions of a block)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)


class SelfAttention(Projections):
    def keys_values(self, x: torch.Tensor, rope: RopeTable) -> tuple[torch.Tensor, torch.Tensor]:
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), rope)
        return k, self.v(x).unflatten(-1, (self.num_heads, -1))  # (B, L, H, D) each

    def write(self, x: torch.Tensor, layer: int, ctx: SelfAttnContext) -> None:
        """Only the keys/values of `x` into the cache (a commit pass's last layer); for a
        cross-session batch, each row's into its own cache."""
        rows = ctx.rows or (CachedRow(ctx.cache, ctx.slots, ctx.rope),)  # type: ignore[arg-type]
        for i, row in enumerate(rows):
            k, v = self.keys_values(x if ctx.rows is None else x[i : i + 1], row.rope)
            row.cache.write(layer, k, v, row.slots)

    def forward(self, x: torch.Tensor, layer: int, ctx: SelfAttnContext) -> torch.Tensor:
        """The projections run on every row at once; RoPE, the cache write and attention once
        for the pass, or per row of a cross-session batch (`ctx.rows`), each row exactly as
        that session's pass alone computes it (its own positions and context length)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        if ctx.rows is None:
            assert ctx.rope is not None
            out = self._attend(q, k, v, layer, ctx.rope, ctx.cache, ctx.slots, ctx.scale, ctx.mask)
        else:
            out = torch.cat([
                self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], layer, row.rope,
                             row.cache, row.slots, ctx.scale)
                for i, row in enumerate(ctx.rows)
            ])  # fmt: skip
        return self.o(out.flatten(2))

    @staticmethod
    def _attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, rope: RopeTable,
        cache: KVCache | None, slots: ChunkSlots | None, scale: float | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            assert slots is not None
            cache.write(layer, k, v, slots)
            k, v = cache.context(layer, slots)
        return attention(q, k, v, scale=scale, mask=mask)  # (B, L, H, D)


class CrossAttention(Projections):
    def keys_values(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(text)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(text).unflatten(-1, (self.num_heads, -1))  # (B, Lt, H, D) each

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v).flatten(2))
