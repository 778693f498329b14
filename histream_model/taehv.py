"""A tiny streaming decoder in the TAEHV layout (`taew2_1`) for the Wan2.1 latent space
(REFERENCE 8; our own implementation).

Every convolution is 2D and runs per frame; time enters only through the memory blocks (each
sees its own input of the previous frame) and the temporal upsampling (`TGrow`: one frame's
channels split into `stride` consecutive frames). The parameter names are those of the
published checkpoints (`decoder.<index>.*` of one `nn.Sequential`, likewise `encoder.*`), so
`taew2_1.pth` / `.safetensors` load without renaming (`histream_model.weights.vae.load_vae`).

Streaming keeps, per memory block, its last input frame (`TAEHVDecodeState`): O(1) memory in the
video's length, and the same interface as `WanVAE` (`new_decode_state`, `decode_chunk`,
`decode_frames`, `resume_decode_state`, `decode`), so the decode pool and `histream generate`
take either. The first latent frame gives 1 video frame and each later one 4, as with the Wan
VAE (the decoder makes 4 per latent frame and the stream's first 3 are dropped). Latents are the
DiT's normalised ones, taken as they are; frames come out in [-1, 1] like the Wan VAE's (the
network's [0, 1] output, clamped, mapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from histream_model.vae import check_stream_latents


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    channels: tuple[int, int, int] = (256, 128, 64)  # decoder widths, low to high resolution
    time_strides: tuple[int, int, int] = (1, 2, 2)  # decoder temporal upsampling per stage
    encoder_channels: int = 64
    encoder_time_strides: tuple[int, int, int] = (2, 2, 1)
    with_encoder: bool = False  # decode-only checkpoints have no encoder

    spatial_stride = 8  # three 2x upsamplings

    @property
    def temporal_stride(self) -> int:
        return math.prod(self.time_strides)

    @property
    def receptive_latent_frames(self) -> int:
        """Latent frames a stream's state depends on: a tail this long rebuilds it exactly
        (3 memory blocks per stage, each reaching one of its own frames back)."""
        rates = [math.prod(self.time_strides[:k]) for k in range(3)]  # frames per latent frame
        return math.ceil(sum(3 / rate for rate in rates))


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv stack(cat[x, x of the previous frame]) + skip(x))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampling: one frame's n channels -> `stride` frames (1x1 conv to n * stride)."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C, H, W) -> (B, T * stride, C, H, W)
        b, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).view(b, t * self.stride, c, h, w)


class TPool(nn.Module):
    """Temporal downsampling: `stride` consecutive frames' channels -> one frame (1x1 conv)."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C, H, W) -> (B, T / stride, C, H, W)
        b, t, c, h, w = x.shape
        return self.conv(x.reshape(b * t // self.stride, self.stride * c, h, w)).view(
            b, t // self.stride, c, h, w
        )


def _decoder(config: TAEHVConfig) -> nn.Sequential:
    c0, c1, c2 = config.channels
    s0, s1, s2 = config.time_strides
    return nn.Sequential(
        Clamp(), _conv(config.latent_channels, c0), nn.ReLU(),
        MemBlock(c0, c0), MemBlock(c0, c0), MemBlock(c0, c0),
        nn.Upsample(scale_factor=2), TGrow(c0, s0), _conv(c0, c1, bias=False),
        MemBlock(c1, c1), MemBlock(c1, c1), MemBlock(c1, c1),
        nn.Upsample(scale_factor=2), TGrow(c1, s1), _conv(c1, c2, bias=False),
        MemBlock(c2, c2), MemBlock(c2, c2), MemBlock(c2, c2),
        nn.Upsample(scale_factor=2), TGrow(c2, s2), _conv(c2, c2, bias=False),
        nn.ReLU(), _conv(c2, 3),
    )  # fmt: skip


def _encoder(config: TAEHVConfig) -> nn.Sequential:
    n = config.encoder_channels
    layers: list[nn.Module] = [_conv(3, n), nn.ReLU()]
    for stride in config.encoder_time_strides:
        layers += [TPool(n, stride), _conv(n, n, bias=False, stride=2)]
        layers += [MemBlock(n, n) for _ in range(3)]
    layers.append(_conv(n, config.latent_channels))
    return nn.Sequential(*layers)


def _run(layers: nn.Sequential, x: Tensor, pasts: list[Tensor | None]) -> Tensor:
    """Frames (B, T, C, H, W) through `layers`; `pasts` (one per memory block, None: zeros, the
    stream's start) holds each block's previous input frame and is updated in place."""
    k = 0
    for layer in layers:
        if isinstance(layer, MemBlock):
            previous = pasts[k]
            if previous is None:
                previous = torch.zeros_like(x[:, 0])
            past = torch.cat([previous[:, None], x[:, :-1]], dim=1)
            pasts[k] = x[:, -1]
            b, t = x.shape[:2]
            x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (b, t))
            k += 1
        elif isinstance(layer, TGrow | TPool):
            x = layer(x)
        else:
            x = layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return x


@dataclass(frozen=True, eq=False)
class TAEHVDecodeState:
    """One stream's decoder memory; `decode_chunk` returns a new one and leaves this intact."""

    pasts: tuple[Tensor | None, ...]  # per memory block: its input of the last frame
    latent_frames: int = 0  # latent frames decoded so far; the stream's first drops 3 frames
    latent_size: tuple[int, int, int] | None = None  # (batch, h, w), fixed by the first chunk


class TAEHV(nn.Module):
    """The TAEHV-layout tiny autoencoder: `decoder` (and `encoder` when the checkpoint has one)."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()) -> None:
        super().__init__()
        self.config = config
        self.decoder = _decoder(config)
        self.encoder = _encoder(config) if config.with_encoder else None
        self.num_memory = sum(isinstance(m, MemBlock) for m in self.decoder)

    # The Wan VAE's interface, so the decode pool takes either.
    def new_decode_state(self) -> TAEHVDecodeState:
        return TAEHVDecodeState(pasts=(None,) * self.num_memory)

    def _check_latents(self, z: Tensor, state: TAEHVDecodeState) -> None:
        entries = (len(state.pasts), self.num_memory)
        check_stream_latents(z, self.config.latent_channels, state.latent_size, entries)

    @torch.no_grad()
    def decode_chunk(self, z: Tensor, state: TAEHVDecodeState) -> tuple[Tensor, TAEHVDecodeState]:
        """Decode the next latent frames of a stream: z (B, C, T, h, w) normalised latents ->
        frames (B, 3, F, 8h, 8w) in [-1, 1], F = 4T, or 1 + 4(T - 1) for a stream's first chunk,
        and the stream's new state."""
        self._check_latents(z, state)
        b, _, t, h, w = z.shape
        pasts = list(state.pasts)
        weight = self.decoder[1].weight
        x = z.to(device=weight.device, dtype=weight.dtype).transpose(1, 2)  # (B, T, C, h, w)
        frames = _run(self.decoder, x, pasts)  # (B, 4T, 3, H, W) in about [0, 1]
        if state.latent_frames == 0:
            frames = frames[:, self.config.temporal_stride - 1 :]
        out = frames.clamp(0.0, 1.0).mul(2.0).sub(1.0).transpose(1, 2).contiguous()
        new_state = TAEHVDecodeState(
            pasts=tuple(pasts), latent_frames=state.latent_frames + t, latent_size=(b, h, w)
        )
        return out, new_state

    def decode_frames(self, z: Tensor, state: TAEHVDecodeState) -> tuple[Tensor, TAEHVDecodeState]:
        """`decode_chunk` of one stream's latents as float32 CPU frames (F, 3, H, W) in [-1, 1]."""
        frames, state = self.decode_chunk(z, state)
        return frames[0].transpose(0, 1).float().cpu(), state

    @torch.no_grad()
    def resume_decode_state(self, tail: Tensor, decoded_before: int) -> TAEHVDecodeState:
        """A stream's state rebuilt by decoding its last latent frames `tail` (B, C, K, h, w)
        again, after `decoded_before` others: exact once K >= `receptive_latent_frames` (8), as
        each memory block reaches only one frame back."""
        if decoded_before < 0:
            raise ValueError(f"decoded_before={decoded_before} must be >= 0")
        start = TAEHVDecodeState(pasts=(None,) * self.num_memory, latent_frames=decoded_before)
        _, state = self.decode_chunk(tail, start)
        return state

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, C, T, h, w) -> frames (B, 3, 1 + 4(T - 1), 8h, 8w) in [-1, 1]."""
        frames, _ = self.decode_chunk(z, self.new_decode_state())
        return frames

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> latents (B, C, 1 + k, H/8, W/8), when the
        checkpoint has an encoder. The first frame is repeated 3 times in front (the inverse
        of the decoder dropping its first 3)."""
        if self.encoder is None:
            raise ValueError("this TAEHV checkpoint has no encoder (decode-only)")
        stride = math.prod(self.config.encoder_time_strides)
        if x.ndim != 5 or x.shape[1] != 3 or (x.shape[2] - 1) % stride:
            raise ValueError(f"video must be (B, 3, 1 + {stride}k, H, W), got {tuple(x.shape)}")
        weight = self.encoder[0].weight
        frames = x.to(device=weight.device, dtype=weight.dtype).add(1.0).div(2.0).transpose(1, 2)
        frames = torch.cat([frames[:, :1].expand(-1, stride - 1, -1, -1, -1), frames], dim=1)
        pasts: list[Tensor | None] = [None] * sum(isinstance(m, MemBlock) for m in self.encoder)
        return _run(self.encoder, frames, pasts).transpose(1, 2).contiguous()


def build_taehv(
    config: TAEHVConfig = TAEHVConfig(),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TAEHV:
    """A randomly initialised TAEHV-layout model (deterministic under torch.manual_seed)."""
    with torch.device(device or "cpu"):
        model = TAEHV(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
