"""The Wan2.1 VAE's layers: causal and streaming 3D convolutions, residual and attention blocks,
the resamplers, the encoder and the decoder (`vae.py` assembles them into `WanVAE`).

Causality: every 3D conv pads only in the past along time. A streaming conv keeps its last input
frames in the caller's `History` (one entry per conv, by its `slot`), so one model serves many
interleaved streams.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histream_model.config import VAEConfig

# Features run channels-last (B, T, H, W, C in memory): oneDNN's native conv layout, and the
# channel norms reduce over contiguous memory.
CHANNELS_LAST = torch.channels_last_3d

# A stream's history: one entry per streaming conv (indexed by its `slot`), None before any input.
History = list[Tensor | None]


def _rms_normalize(x: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Unit L2 norm along `dim`, into `out` if given; half precision is normalised in fp32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        y = F.normalize(x.float(), dim=dim)
        return y.to(x.dtype) if out is None else out.copy_(y)
    return F.normalize(x, dim=dim, out=out)


def _conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
) -> Tensor:
    """F.conv3d, sent straight to oneDNN for fp32 on the CPU.

    For batch 1 with few channels F.conv3d picks its im2col fallback, 10-20x slower than oneDNN.
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()  # training (autograd) takes F.conv3d
        and torch.backends.mkldnn.is_available()
        and hasattr(torch, "mkldnn_convolution")  # undocumented: fall back if it ever goes
    ):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


class RMSNorm(nn.Module):
    """Channel RMS norm: normalize(x) * sqrt(C) * gamma (the original's `RMS_norm`, no bias)."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        # (C, 1, 1, 1) for video features, (C, 1, 1) for per-frame images: the checkpoint's shapes.
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The normalised features, written into `out` when given (a causal conv's input)."""
        if out is None and torch.is_grad_enabled():  # training: out of place, for autograd
            return _rms_normalize(x, dim=1) * (self.gamma * self.scale)
        return _rms_normalize(x, dim=1, out=out).mul_(self.gamma * self.scale)


class Conv3d(nn.Conv3d):
    """nn.Conv3d through `_conv3d` (used as is for the 1x1x1 shortcut and latent projections)."""

    def forward(self, x: Tensor) -> Tensor:
        return _conv3d(x, self.weight, self.bias, self.stride, self.padding)  # type: ignore[arg-type]


class StreamingConv3d(Conv3d):
    """A 3D conv that reads and writes its own entry (`slot`) of a stream's history."""

    slot: int = -1  # set by `_number_slots` once the whole encoder or decoder is built


class CausalConv3d(StreamingConv3d):
    """3D conv zero-padded only in the past along time; later calls see earlier frames instead.

    Spatial padding is `kernel // 2` on each side; the time padding is `kernel_t - 1` past frames,
    taken from the history (zeros at the start of a stream). Given the `norm` that precedes it,
    the conv writes silu(norm(x)) straight into its padded input, saving a copy of the features.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: tuple[int, int, int]) -> None:
        kt, kh, kw = kernel_size
        super().__init__(in_dim, out_dim, kernel_size, padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1

    def forward(self, x: Tensor, history: History, norm: RMSNorm | None = None) -> Tensor:
        p = self.past_frames
        last = history[self.slot]
        if torch.is_grad_enabled():  # training: the same values, out of place for autograd
            h = x if norm is None else F.silu(norm(x))
            past = h.new_zeros(*h.shape[:2], p, *h.shape[3:]) if last is None else last
            padded = torch.cat([past, h], dim=2)
            history[self.slot] = padded[:, :, -p:]
            return super().forward(padded)
        b, c, t, h, w = x.shape
        padded = torch.empty(
            (b, c, p + t, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST
        )
        past, current = padded[:, :, :p], padded[:, :, p:]  # (B, C, P, H, W), (B, C, T, H, W)
        if last is None:
            past.zero_()
        else:
            past.copy_(last)
        if norm is None:
            current.copy_(x)
        else:
            F.silu(norm(x, out=current), inplace=True)
        # A copy, so the history does not keep the whole padded input alive between steps.
        history[self.slot] = padded[:, :, -p:].clone()
        return super().forward(padded)  # (B, C', T, H, W)


class TemporalDownConv(StreamingConv3d):
    """Halves the frame rate: a (3, 1, 1) conv with stride 2 over [last frame seen, chunk].

    The first chunk of a stream (a single frame) has nothing to pair with and passes through.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, history: History) -> Tensor:
        past = history[self.slot]
        history[self.slot] = x[:, :, -1:].clone()
        if past is None:
            return x
        return super().forward(torch.cat([past, x], dim=2))  # (B, C, T / 2, H, W)


class FrameConv2d(nn.Conv2d):
    """A 2D conv applied to every frame of a (B, C, T, H, W) video."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.unsqueeze(2)  # (C', C, 1, k, k)
        stride, padding = self.stride, self.padding
        return _conv3d(x, weight, self.bias, (1, *stride), (0, *padding))  # type: ignore[arg-type]


class ResidualBlock(nn.Module):
    """(norm, SiLU, causal conv) x 2 plus a shortcut (a 1x1x1 conv when channels change)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices 0..6 give the checkpoint's names (`residual.2.weight`, ...). The convs apply
        # the norms and SiLUs themselves; index 5 is the original's dropout (inactive).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, spatial_dims=3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, (3, 3, 3)),
            RMSNorm(out_dim, spatial_dims=3),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, (3, 3, 3)),
        )
        self.shortcut = Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, history: History) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = self.shortcut(x)
        x = conv1(x, history, norm=norm1)  # conv1(silu(norm1(x)))
        x = conv2(x, history, norm=norm2)
        return x.add_(h)  # x is a fresh conv output, safe to add into


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        # The 1x1 convs are linear maps over channels; run them on (frame, pixel, channel) tokens.
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)  # (B*T, 1, H*W, C)
        tokens = _rms_normalize(tokens, dim=-1) * (self.norm.gamma.view(c) * self.norm.scale)
        qkv = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)  # (B*T, 1, H*W, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)  # (B*T, 1, H*W, C)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MiddleBlock(nn.Sequential):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))

    def forward(self, x: Tensor, history: History) -> Tensor:
        res1, attn, res2 = self
        return res2(attn(res1(x, history)), history)


class Head(nn.Sequential):
    """Norm, SiLU and the causal conv to the output channels."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(
            RMSNorm(in_dim, spatial_dims=3), nn.SiLU(), CausalConv3d(in_dim, out_dim, (3, 3, 3))
        )

    def forward(self, x: Tensor, history: History) -> Tensor:
        norm, _, conv = self
        return conv(x, history, norm=norm)  # conv(silu(norm(x)))


class Downsample(nn.Module):
    """Halves height and width (zero pad right/bottom, 3x3 conv, stride 2); optionally time too."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad3d((0, 1, 0, 1, 0, 0)), FrameConv2d(dim, dim, 3, 2))
        self.time_conv = TemporalDownConv(dim) if temporal else None

    def forward(self, x: Tensor, history: History) -> Tensor:
        x = self.resample(x)  # (B, C, T, H/2, W/2)
        return x if self.time_conv is None else self.time_conv(x, history)


class Upsample(nn.Module):
    """Doubles height and width (nearest, then a 3x3 conv to half the channels); optionally time.

    Temporal upsampling is a causal conv to twice the channels whose two halves become two
    consecutive frames. The first frame of a stream skips it, so it stays a single frame.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Plain "nearest" equals the original's "nearest-exact" for an exact 2x.
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest"),
            FrameConv2d(dim, dim // 2, 3, padding=1),
        )
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, history: History, first_frame: bool) -> Tensor:
        if self.time_conv is not None and not first_frame:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, history).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 2C)
            # Channel halves become frames 2i and 2i + 1, written channels-last in one copy.
            pairs = y.unflatten(-1, (2, c)).permute(0, 1, 4, 2, 3, 5)  # (B, T, 2, H, W, C)
            x = pairs.reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, 2T, H, W)
        return self.resample(x)  # (B, C/2, T', 2H, 2W)


def _number_slots(module: nn.Module) -> int:
    """Give every streaming conv its own history entry; returns how many entries a stream needs."""
    convs = [m for m in module.modules() if isinstance(m, StreamingConv3d)]
    for slot, conv in enumerate(convs):
        conv.slot = slot
    return len(convs)


class Encoder3d(nn.Module):
    """Video (B, 3, 1 + 4k, H, W) -> posterior (B, 2 z_dim, 1 + k, H/8, W/8), chunk by chunk."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], (3, 3, 3))
        blocks: list[nn.Module] = []
        last_stage = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for j in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i < last_stage:
                blocks.append(Downsample(out_dim, temporal=config.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = MiddleBlock(dims[-1])
        self.head = Head(dims[-1], 2 * config.z_dim)
        self.num_slots = _number_slots(self)

    def forward(self, x: Tensor, history: History) -> Tensor:
        x = self.conv1(x, history)
        for block in self.downsamples:
            x = block(x, history)
        return self.head(self.middle(x, history), history)


class Decoder3d(nn.Module):
    """One latent frame (B, z_dim, 1, h, w) -> 1 (first) or 4 video frames (B, 3, F, 8h, 8w)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *reversed(mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], (3, 3, 3))
        self.middle = MiddleBlock(dims[0])
        blocks: list[nn.Module] = []
        last_stage = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for j in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i < last_stage:
                blocks.append(Upsample(out_dim, temporal=temporal_upsample[i]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = Head(dims[-1], 3)
        self.num_slots = _number_slots(self)

    def forward(self, x: Tensor, history: History, first_frame: bool) -> Tensor:
        x = self.middle(self.conv1(x, history), history)
        for block in self.upsamples:
            x = block(x, history, first_frame) if isinstance(block, Upsample) else block(x, history)
        return self.head(x, history)
