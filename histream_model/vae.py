"""Wan2.1 causal 3D VAE: encoder, decoder and streaming decode (REFERENCE 4).

Parameter names are exactly those of the original `wan/modules/vae.py` `WanVAE_` (the keys of
`Wan2.1_VAE.pth`), so the original checkpoint loads without renaming.

Causality: every 3D conv pads only in the past along time. Streaming keeps, per causal conv, its
last 2 input frames (its "history") and decodes one latent frame per step: the first latent frame
skips temporal upsampling and gives 1 video frame, each later one gives `temporal_stride` (4).
The history lives in a `VAEDecodeState` that the caller passes in and gets back, so one model
serves many interleaved streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from histream_model.config import Preset, VAEConfig
from histream_model.vae_layers import CHANNELS_LAST, Conv3d, Decoder3d, Encoder3d, History


@dataclass(frozen=True, eq=False)
class VAEDecodeState:
    """One stream's decoder memory; `decode_chunk` returns a new one and leaves this one intact."""

    history: tuple[Tensor | None, ...]  # per streaming conv (by slot): its last input frames
    latent_frames: int = 0  # latent frames decoded so far; frame 0 skips temporal upsampling
    latent_size: tuple[int, int, int] | None = None  # (batch, h, w), fixed by the first chunk


def check_stream_latents(
    z: Tensor,
    channels: int,
    latent_size: tuple[int, int, int] | None,
    entries: tuple[int, int],
) -> None:
    """A streaming decoder's checks of a latent chunk: (B, channels, T, h, w) with no empty
    axis, of the stream's (batch, h, w), against a state of the right number of entries
    (`entries`: the state's, the decoder's)."""
    if z.ndim != 5 or z.shape[1] != channels or 0 in z.shape:
        raise ValueError(
            f"latents must be (B, {channels}, T, h, w) with no empty axis, "
            f"got shape {tuple(z.shape)}"
        )
    if entries[0] != entries[1]:
        raise ValueError(
            f"decode state has {entries[0]} entries; this decoder needs {entries[1]} "
            "(make it with new_decode_state())"
        )
    size = (z.shape[0], z.shape[3], z.shape[4])
    if latent_size is not None and size != latent_size:
        raise ValueError(
            f"latent chunk (batch, h, w)={size} does not match the stream's {latent_size}"
        )


class WanVAE(nn.Module):
    """The Wan2.1 VAE (`WanVAE_` in the original): encoder, quant convs, decoder.

    `encode` and `decode` work on normalized latents, (mu - mean) / std per channel, which is
    what the DiT consumes and produces.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = Conv3d(2 * z, 2 * z, 1)  # posterior (mu, log_var) projection
        self.conv2 = Conv3d(z, z, 1)  # latent projection before the decoder
        self.decoder = Decoder3d(config)
        # Not in the checkpoint (non-persistent), and made on the CPU even under a meta device
        # context so that a meta-built model gets real statistics when weights are assigned.
        for name, values in (
            ("latents_mean", config.latents_mean),
            ("latents_std", config.latents_std),
        ):
            stats = torch.tensor(values, dtype=torch.float32, device="cpu").view(1, z, 1, 1, 1)
            self.register_buffer(name, stats, persistent=False)

    def _check_video(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if (t - 1) % cfg.temporal_stride:
            raise ValueError(f"video has {t} frames; must be 1 + {cfg.temporal_stride}k")
        if h % cfg.spatial_stride or w % cfg.spatial_stride or not (h and w):
            raise ValueError(
                f"video size {h}x{w} must be a positive multiple of {cfg.spatial_stride} per side"
            )

    def _check_latents(self, z: Tensor, state: VAEDecodeState) -> None:
        check_stream_latents(
            z, self.config.z_dim, state.latent_size, (len(state.history), self.decoder.num_slots)
        )

    def posterior(self, x: Tensor, history: History | None = None) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior (mu, log_var) (B, 2z, 1 + k, h, w),
        un-normalised: chunks of 1, 4, 4, ... frames each give one latent frame. Differentiable
        (training calls it under autograd; `encode` without).

        `history` continues a stream: a list of `encoder.num_slots` entries, all None for the
        stream's first call, which this call updates in place; a call after the first takes 4k
        frames (chunks of 4, 4, ...)."""
        stride = self.config.temporal_stride
        first = history is None or all(h is None for h in history)
        if first:
            self._check_video(x)
        elif x.ndim != 5 or x.shape[2] % stride:
            raise ValueError(
                f"a stream's later video must be (B, 3, {stride}k, H, W), got {tuple(x.shape)}"
            )
        if history is None:
            history = [None] * self.encoder.num_slots
        x = x.to(self.latents_std.dtype)
        starts = range(1, x.shape[2], stride) if first else range(0, x.shape[2], stride)
        bounds = [(0, 1)] * first + [(s, s + stride) for s in starts]
        # The first conv copies each chunk into its channels-last input, so no copy here.
        latents = [self.encoder(x[:, :, a:b], history) for a, b in bounds]  # (B, 2z, 1, h, w) each
        return self.conv1(torch.cat(latents, dim=2))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalized latent means (B, z, 1 + k, H/8, W/8);
        the log-variance is dropped."""
        mu = self.posterior(x)[:, : self.config.z_dim]
        return ((mu - self.latents_mean) / self.latents_std).contiguous()

    def new_decode_state(self) -> VAEDecodeState:
        return VAEDecodeState(history=(None,) * self.decoder.num_slots)

    @torch.no_grad()
    def decode_chunk(self, z: Tensor, state: VAEDecodeState) -> tuple[Tensor, VAEDecodeState]:
        """Decode the next latent frames of a stream.

        z: normalized latents (B, z_dim, T, h, w). Returns frames (B, 3, F, 8h, 8w) in [-1, 1],
        F = 4T, or 1 + 4(T - 1) for a stream's first chunk, and the stream's new state.
        """
        self._check_latents(z, state)
        cfg = self.config
        b, _, t, h, w = z.shape
        history = list(state.history)
        x = z.to(self.latents_std.dtype) * self.latents_std + self.latents_mean
        x = self.conv2(x.contiguous(memory_format=CHANNELS_LAST))  # (B, z, T, h, w)
        first = state.latent_frames == 0
        num_frames = cfg.temporal_stride * t - (cfg.temporal_stride - 1 if first else 0)
        s = cfg.spatial_stride
        out = x.new_empty(b, 3, num_frames, s * h, s * w)
        start = 0
        for i in range(t):
            first_frame = first and i == 0
            frames = self.decoder(x[:, :, i : i + 1], history, first_frame)  # (B, 3, 1 or 4, H, W)
            stop = start + frames.shape[2]
            torch.clamp(frames, -1.0, 1.0, out=out[:, :, start:stop])
            start = stop
        new_state = VAEDecodeState(
            history=tuple(history), latent_frames=state.latent_frames + t, latent_size=(b, h, w)
        )
        return out, new_state

    def decode_frames(self, z: Tensor, state: VAEDecodeState) -> tuple[Tensor, VAEDecodeState]:
        """`decode_chunk` of one stream's latents (any dtype or device) as float32 CPU frames
        (F, 3, H, W) in [-1, 1], the layout video encoders take, and the new state."""
        weight = self.conv2.weight
        frames, state = self.decode_chunk(z.to(device=weight.device, dtype=weight.dtype), state)
        return frames[0].transpose(0, 1).float().cpu(), state  # (F, 3, H, W)

    @torch.no_grad()
    def resume_decode_state(self, tail: Tensor, decoded_before: int) -> VAEDecodeState:
        """A stream's state rebuilt from its last latent frames: `tail` (B, z, K, h, w) are
        the K latent frames decoded last, after `decoded_before` others. The causal convs'
        history is re-made by decoding the tail again (the frames are thrown away); with the
        whole stream as the tail (`decoded_before` 0) the state is exact, otherwise the history
        begins at zeros K frames back, which the decoder forgets as K grows."""
        if decoded_before < 0:
            raise ValueError(f"decoded_before={decoded_before} must be >= 0")
        start = VAEDecodeState(
            history=(None,) * self.decoder.num_slots, latent_frames=decoded_before
        )
        weight = self.conv2.weight
        _, state = self.decode_chunk(tail.to(device=weight.device, dtype=weight.dtype), start)
        return state

    def decode(self, z: Tensor) -> Tensor:
        """Normalized latents (B, z, T, h, w) -> frames (B, 3, 1 + 4(T - 1), 8h, 8w) in [-1, 1]."""
        frames, _ = self.decode_chunk(z, self.new_decode_state())
        return frames


def build_vae(
    config: VAEConfig | Preset,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> WanVAE:
    """A randomly initialised VAE (deterministic under torch.manual_seed); device may be "meta"."""
    if isinstance(config, Preset):
        config = config.vae
    with torch.device(device or "cpu"):
        model = WanVAE(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
