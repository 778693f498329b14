"""Scaled dot-product attention: flash-attn on CUDA when importable, torch SDPA otherwise."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

FlashFn = Callable[..., torch.Tensor]


@cache
def _flash_attn() -> FlashFn | None:
    try:
        from flash_attn import flash_attn_func  # optional: the `gpu` extra
    except ImportError:
        return None
    return flash_attn_func


def backend_for(q: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """Which kernel `attention` uses for these inputs: "flash-attn" or "sdpa"."""
    if (
        mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and _flash_attn() is not None
    ):
        return "flash-attn"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `scale` is the softmax scale (default 1/sqrt(D)); `mask` is a boolean [Lq, Lk] where True
    means "may attend".
    """
    if backend_for(q, mask) == "flash-attn":
        flash = _flash_attn()
        assert flash is not None
        return flash(q, k, v, softmax_scale=scale)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # (B, H, Lq, D)
    return out.transpose(1, 2)


def scaled_softmax_scale(head_dim: int, factor: float, reference_tokens: int) -> float:
    """CineScale attention scaling: (1/sqrt(d)) * log(N_ref * c) / log(N_ref).

    `reference_tokens` is N_ref, the tokens per latent frame at the resolution the model was tuned
    at; `factor` is c (HiStream uses 2 on the first chunk, 1 afterwards, where this is 1/sqrt(d)).
    """
    if reference_tokens < 2:
        raise ValueError(f"reference_tokens={reference_tokens} must be >= 2")
    if factor <= 0:
        raise ValueError(f"attention scale factor={factor} must be > 0")
    return math.log(reference_tokens * factor) / math.log(reference_tokens) / math.sqrt(head_dim)
