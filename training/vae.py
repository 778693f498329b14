"""Training the toy preset's VAE (the Wan2.1 architecture, `histream_model.vae.WanVAE`).

Reconstruction of random crops of procedural clips: L1 + MSE on the pixels and a small KL term on
the posterior, the encoder run chunk by chunk (1, 4, 4 frames) and the decoder latent frame by
latent frame, exactly as inference streams them; first on short clips, then also on long streams
whose histories carry over from step to step (`StreamedClips`). The layers take an out-of-place
path under autograd; inference (no grad) keeps its in-place one.

Afterwards the latent statistics are measured on whole clips and folded into the posterior and
latent projections (`conv1`, `conv2`), so the normalised latents are zero-mean, unit-variance
under Wan2.1's own latent mean/std: the checkpoint then loads through the original-layout loader
unchanged, like `Wan2.1_VAE.pth`.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from histream_model.config import VAEConfig
from histream_model.vae import WanVAE
from histream_model.vae_layers import AttentionBlock, ResidualBlock
from training.data import render, sample_scene
from training.optim import Optimiser, Progress

# Clips of 13 frames (4 latent frames): the causal convs learn to carry their history across
# several 4-frame chunks, as a long stream needs (2 latent frames are not enough).
BATCH, FRAMES, CROP = 4, 13, 40
ON_OBJECT = 0.8  # the share of crops that hold an object


def vae_forward(
    vae: WanVAE,
    video: Tensor,
    generator: torch.Generator,
    encoded: list[Tensor | None] | None = None,
    decoded: list[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable encode -> sample -> decode of a video (B, 3, 1 + 4k, H, W) in [-1, 1].

    `encoded`/`decoded` (the encoder's and decoder's stream histories, updated in place) continue
    a stream: then `video` is its next 4k frames. Returns the reconstruction and the KL
    divergence of the posterior (mean over elements).
    """
    if decoded is None:
        decoded = [None] * vae.decoder.num_slots
    first = all(h is None for h in decoded)
    mu, log_var = vae.posterior(video, encoded).chunk(2, dim=1)
    log_var = log_var.clamp(-30.0, 20.0)
    noise = torch.randn(mu.shape, generator=generator).to(mu.device)
    z = vae.conv2(mu + noise * (0.5 * log_var).exp())
    frames = [vae.decoder(z[:, :, i : i + 1], decoded, first and i == 0) for i in range(z.shape[2])]
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).mean()
    return torch.cat(frames, dim=2), kl


class StreamedClips:
    """Long-stream training: `batch` crop clips of `latents` latent frames, trained `per_step`
    latent frames a step with the encoder's and decoder's histories carried from step to step
    (detached: no backpropagation through earlier steps), so the causal convs learn what a
    stream of hundreds of frames feeds them, not only the fresh start of a short clip.
    (Measured on a VAE trained on 13-frame clips alone: its error on frames 29-56 of a stream
    was 4x that on frames 0-12.) A clip's last step starts a new set of clips."""

    def __init__(
        self, vae: WanVAE, rng: random.Random, batch: int, size: tuple[int, int], crop: int,
        latents: int = 15, per_step: int = 3, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.vae, self.rng, self.batch, self.size, self.crop = vae, rng, batch, size, crop
        self.device = device
        self.frames, self.per_step = 1 + 4 * (latents - 1), per_step
        self.position = self.frames  # starts a clip on the first call

    def step(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, target, KL) of the streams' next frames."""
        if self.position >= self.frames:
            self.clips = crop_batch(self.rng, self.batch, self.frames, self.size, self.crop)
            self.clips = self.clips.to(self.device)
            self.position = 0
            self.encoded: list[Tensor | None] = [None] * self.vae.encoder.num_slots
            self.decoded: list[Tensor | None] = [None] * self.vae.decoder.num_slots
        count = 4 * self.per_step - 3 if self.position == 0 else 4 * self.per_step
        target = self.clips[:, :, self.position : self.position + count]
        recon, kl = vae_forward(self.vae, target, generator, self.encoded, self.decoded)
        self.position += target.shape[2]
        for history in (self.encoded, self.decoded):
            history[:] = [None if h is None else h.detach() for h in history]
        return recon, target, kl


@torch.no_grad()
def _init_for_training(vae: WanVAE) -> None:
    """Variance-preserving conv weights and residual blocks and attention starting as identities
    (their last conv zeroed): with PyTorch's default init the signal shrinks about 2x per stage
    and training sits for hundreds of steps at the mean image. (Biases keep their random init:
    the channel norms cannot tell parallel feature vectors apart, e.g. black from white, without
    an offset.) The posterior starts narrow (std 0.05), as unit noise would drown the means."""
    for p in vae.parameters():
        if p.ndim >= 4:  # conv weights: variance-preserving (PyTorch's default shrinks by 3)
            p.normal_(0.0, p[0].numel() ** -0.5)
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            module.residual[6].weight.zero_()
        elif isinstance(module, AttentionBlock):
            module.proj.weight.zero_()
    vae.conv1.bias[vae.config.z_dim :] = -6.0


def crop_batch(
    rng: random.Random,
    batch: int,
    frames: int,
    size: tuple[int, int],
    crop: int,
    on_object: float = ON_OBJECT,
) -> Tensor:
    """`batch` random clips rendered at `size` (h, w), cropped to crop x crop: (B, 3, T, c, c).

    With probability `on_object` a crop holds an object (its centre at a random frame of the
    clip lies inside the crop): crops placed uniformly mostly show flat background (a large
    object covers 3% of a frame), and a VAE trained on them smears, fades and recolours the
    objects while its mean error looks good."""
    height, width = size
    clips = []
    for _ in range(batch):
        scene = sample_scene(rng.randrange(2**31))
        start = rng.randrange(200)
        video = render(scene, height, width, frames, start=start)  # (T, 3, H, W)
        if rng.random() < on_object:
            frame = start + rng.randrange(frames)
            x, y = rng.choice(scene.objects).centre(frame, height, width)
            top = min(max(int(y) - rng.randrange(crop), 0), height - crop)
            left = min(max(int(x) - rng.randrange(crop), 0), width - crop)
        else:
            top, left = rng.randrange(height - crop + 1), rng.randrange(width - crop + 1)
        clips.append(video[:, :, top : top + crop, left : left + crop].transpose(0, 1))
    return torch.stack(clips)


def train_vae(
    config: VAEConfig,
    steps: int,
    seed: int,
    size: tuple[int, int],
    stream_steps: int = 0,
    batch: int = BATCH,
    frames: int = FRAMES,
    crop: int = CROP,
    lr: float = 1e-3,
    kl_weight: float = 1e-5,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> tuple[WanVAE, list[float]]:
    """A VAE trained from `seed` for `steps` AdamW steps on short clips, then `stream_steps` more
    that alternate long-stream steps (`StreamedClips`) with short-clip ones (so the fresh start
    of a stream stays as sharp); one learning-rate schedule over all. Returns it (on `device`)
    and the loss per step. Random draws are made on the CPU whatever the device."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = WanVAE(config).train()
    _init_for_training(vae)
    vae.to(device)
    optimiser = Optimiser(vae.parameters(), lr, steps + stream_steps)
    streams = StreamedClips(vae, rng, batch, size, crop, device=device)
    for step in range(steps + stream_steps):
        if step >= steps and (step - steps) % 2 == 0:
            recon, video, kl = streams.step(generator)
        else:
            video = crop_batch(rng, batch, frames, size, crop).to(device)
            recon, kl = vae_forward(vae, video, generator)
        error = recon - video
        loss = error.abs().mean() + error.pow(2).mean() + kl_weight * kl
        optimiser.step(loss, progress)
    return vae.eval().requires_grad_(False), optimiser.losses


@torch.no_grad()
def latent_statistics(vae: WanVAE, videos: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the posterior means of videos (B, 3, T, H, W)."""
    mu = vae.posterior(videos)[:, : vae.config.z_dim].transpose(0, 1).flatten(1)  # (z, N)
    return mu.mean(dim=1), mu.std(dim=1)


@torch.no_grad()
def fold_statistics(vae: WanVAE, mean: Tensor, std: Tensor) -> None:
    """Rescale conv1/conv2 so that Wan's latent mean/std normalise this VAE's latents to
    (mu - mean) / std: encode and decode give the same values as with the measured statistics."""
    z = vae.config.z_dim
    wan_mean, wan_std = vae.latents_mean.view(z), vae.latents_std.view(z)
    gain = wan_std / std  # posterior mean mu -> mu' = (mu - mean) * gain + wan_mean
    w1, b1 = vae.conv1.weight, vae.conv1.bias
    w1[:z] *= gain.view(z, 1, 1, 1, 1)
    b1[:z] = (b1[:z] - mean) * gain + wan_mean
    # The decoder sees mu'; conv2 must act as before on mu = (mu' - wan_mean) / gain + mean.
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # (z, z, 1, 1, 1), (z,)
    inverse = 1.0 / gain
    shift = mean - wan_mean * inverse
    b2 += w2.view(z, z) @ shift
    w2 *= inverse.view(1, z, 1, 1, 1)
