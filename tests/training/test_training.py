"""Training: the losses fall on short runs, the latent statistics fold exactly, examples are laid
out as the sliding-window cache lays out frames, and `histream train` writes a checkpoint the
ordinary loaders read."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from histream_model.components import load_components, resolve_weights
from histream_model.config import DiTConfig, HiStreamOptions, VAEConfig, get_preset
from histream_model.text import BuiltinTextEncoder
from histream_model.vae import WanVAE
from services.local.cli import main as cli_main
from training.data import render, sample_scene
from training.dit import (
    centre_on,
    encode_clips,
    layout,
    noise_peak,
    sampler_timesteps,
    train_dit,
)
from training.vae import (
    StreamedClips,
    _init_for_training,
    crop_batch,
    fold_statistics,
    latent_statistics,
    train_vae,
    vae_forward,
)

SMALL_VAE = VAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1)


def _small_preset():
    toy = get_preset("toy")
    dit = DiTConfig(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=1, text_dim=16,
                    text_len=32)  # fmt: skip
    return replace(toy, dit=dit, vae=SMALL_VAE, height=64, width=96)


def _head_tail(losses: list[float], n: int) -> tuple[float, float]:
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def test_vae_loss_falls() -> None:
    _, losses = train_vae(SMALL_VAE, 30, seed=0, size=(32, 48), batch=2, frames=5, crop=32)
    first, last = _head_tail(losses, 5)
    assert last < 0.7 * first, losses


def test_a_streamed_posterior_and_reconstruction_equal_the_whole_clips() -> None:
    """What long-stream training relies on: carrying the histories from call to call gives the
    same posterior and the same decode as one pass over the whole clip."""
    torch.manual_seed(0)
    vae = WanVAE(SMALL_VAE).eval()
    _init_for_training(vae)
    video = torch.stack([render(sample_scene(i), 32, 48, 13).transpose(0, 1) for i in range(2)])
    encoded: list = [None] * vae.encoder.num_slots
    parts = [vae.posterior(video[:, :, :5], encoded), vae.posterior(video[:, :, 5:], encoded)]
    assert torch.allclose(torch.cat(parts, dim=2), vae.posterior(video), atol=1e-5)
    with pytest.raises(ValueError, match="4k"):
        vae.posterior(video[:, :, :3], encoded)
    with torch.no_grad():  # a posterior of no width: the noise (drawn per call) drops out
        vae.conv1.weight[SMALL_VAE.z_dim :] = 0.0
        vae.conv1.bias[SMALL_VAE.z_dim :] = -100.0
    whole, _ = vae_forward(vae, video, torch.Generator().manual_seed(1))
    generator, encoded, decoded = (
        torch.Generator().manual_seed(1),
        [None] * vae.encoder.num_slots,
        [None] * vae.decoder.num_slots,
    )
    first, _ = vae_forward(vae, video[:, :, :5], generator, encoded, decoded)
    second, _ = vae_forward(vae, video[:, :, 5:], generator, encoded, decoded)
    assert torch.allclose(torch.cat([first, second], dim=2), whole, atol=1e-5)


def test_streamed_clips_walk_a_long_clip_then_start_another() -> None:
    torch.manual_seed(0)
    vae = WanVAE(SMALL_VAE).train()
    streams = StreamedClips(vae, random.Random(0), 2, (32, 48), 32, latents=6, per_step=3)
    generator = torch.Generator().manual_seed(0)
    shapes = []
    for _ in range(3):
        recon, target, _ = streams.step(generator)
        assert recon.shape == target.shape
        assert all(h is None or not h.requires_grad for h in streams.decoded)
        shapes.append(target.shape[2])
    assert shapes == [9, 12, 9]  # 1 + 4 + 4, then 4 + 4 + 4 (21 frames = 6 latents), then anew


def test_streamed_vae_training_runs_and_its_loss_falls() -> None:
    _, losses = train_vae(SMALL_VAE, 20, seed=0, size=(32, 48), stream_steps=10, batch=2,
                          frames=5, crop=32)  # fmt: skip
    assert len(losses) == 30
    first, last = _head_tail(losses, 5)
    assert last < 0.7 * first, losses


def test_crops_hold_an_object_as_often_as_asked() -> None:
    """A crop that holds an object shows two colours in some frame; a uniform crop of a
    128x192 frame is mostly flat background."""

    def with_object(on_object: float) -> int:
        clips = crop_batch(random.Random(3), 24, 5, (128, 192), 40, on_object=on_object)
        spread = clips.flatten(3).std(dim=3).amax(dim=(1, 2))  # per clip: its busiest frame
        return int((spread > 0.05).sum())

    assert with_object(1.0) == 24
    assert with_object(0.0) <= 12


def test_folded_statistics_normalise_the_latents() -> None:
    torch.manual_seed(0)
    vae = WanVAE(SMALL_VAE).eval()
    videos = torch.stack([render(sample_scene(i), 32, 48, 9).transpose(0, 1) for i in range(4)])
    before = vae.decode(vae.encode(videos))
    mean, std = latent_statistics(vae, videos)
    fold_statistics(vae, mean, std)
    z = vae.encode(videos)  # normalised with Wan's constants, now those of this VAE's latents
    per_channel = z.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(16), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(16), atol=1e-4)
    assert torch.allclose(vae.decode(z), before, atol=1e-4)  # decoding is unchanged


def test_layouts_follow_the_caches() -> None:
    options = HiStreamOptions()  # chunks of 3, anchor 1, window 2
    first = layout(0, options, sliding=True, gap=50)
    assert first.context == () and first.chunk == (0, 1, 2) and first.positions == (0, 1, 2)
    assert first.mask.all()  # one chunk attends bidirectionally
    later = layout(4, options, sliding=True, gap=50)
    assert later.context == (0, 10, 11) and later.chunk == (12, 13, 14)
    assert later.positions == (0, 60, 61, 62, 63, 64)  # the anchor stays at 0
    assert later.mask.tolist() == [
        [True, False, False, False, False, False],  # the anchor (chunk 0) sees itself
        [True, True, True, False, False, False],  # the window (chunk 3) sees the anchor
        [True, True, True, False, False, False],
        [True, True, True, True, True, True],  # the noisy chunk sees everything
        [True, True, True, True, True, True],
        [True, True, True, True, True, True],
    ]
    full = layout(2, options, sliding=False, gap=50)
    assert full.context == (0, 1, 2, 3, 4, 5) and full.positions == tuple(range(9))
    assert not full.mask[0, 3] and full.mask[3, 0] and full.mask[8, 5]


def test_training_timesteps_are_the_samplers() -> None:
    levels = sampler_timesteps(get_preset("toy"))
    assert levels[-1] == 1000.0 and 400.0 in levels  # 250 warped by shift 2
    assert all(0 < t <= 1000 for t in levels) and list(levels) == sorted(set(levels))


def test_a_scene_drawn_from_pure_noise_is_centred_where_the_noise_peaks() -> None:
    eps = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    eps[0, :, 0, 4:6, 2:4] += 1.0  # token (2, 1)'s patch of the first frame
    eps[1, :, 0, 0:2, 10:12] += 1.0  # token (0, 5)
    eps[1, :, 1:, 2:4, 0:2] += 5.0  # later frames do not count
    tokens = noise_peak(eps, (1, 2, 2))
    assert tokens.tolist() == [[2, 1], [0, 5]]
    centred = torch.zeros(2, 1, 1, 8, 12)
    centred[:, :, :, 2:6, 5:7] = 1.0  # a 4 x 2 object on the frame's centre (4, 6)
    moved = centre_on(centred, tokens, (1, 2, 2))
    rows = lambda clip: sorted({r for r, _ in moved[clip, 0, 0].nonzero().tolist()})  # noqa: E731
    cols = lambda clip: sorted({c for _, c in moved[clip, 0, 0].nonzero().tolist()})  # noqa: E731
    assert rows(0) == [3, 4, 5, 6] and cols(0) == [2, 3]  # centred on token (2, 1)'s (5, 3)
    assert rows(1) == [0, 1, 2, 7] and cols(1) == [10, 11]  # token (0, 5): over the top edge


def test_dit_loss_falls_on_a_small_set() -> None:
    preset = _small_preset()
    torch.manual_seed(0)
    vae = WanVAE(preset.vae).eval()
    text = BuiltinTextEncoder(preset.dit.text_dim, preset.dit.text_len, 512)
    clips = encode_clips(preset, vae, text, count=2, frames=25, seed=0)
    assert clips.latents["high"].shape == (2, 16, 7, 8, 12)
    assert clips.latents["low"].shape == (2, 16, 7, 4, 6)
    _, losses = train_dit(preset, clips, steps=40, seed=0, batch=2, lr=3e-3)
    first, last = _head_tail(losses, 8)
    assert last < 0.8 * first, losses


def test_histream_train_writes_a_loadable_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "toy"
    code = cli_main(["train", "--out", str(out), "--vae-steps", "2",
                     "--vae-stream-steps", "2", "--dit-steps", "2",
                     "--clips", "2", "--clip-frames", "21", "--threads", "2"])  # fmt: skip
    assert code == 0
    facts = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert facts["dit_steps"] == 2 and facts["seconds"]["total"] >= 0
    assert facts["vae_stream_steps"] == 2
    assert "--vae-stream-steps 2 " in (out / "MODEL_CARD.md").read_text()  # the remake command
    for name in (
        "MODEL_CARD.md",
        "loss.png",
        "losses.json",
        "facts.json",
        "transformer/config.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    components = load_components("toy", resolve_weights(out), device="cpu")
    assert components.dit.config == get_preset("toy").dit
    assert components.vae.config.base_dim == get_preset("toy").vae.base_dim
    card = (out / "MODEL_CARD.md").read_text()
    assert "--dit-steps 2" in card and f"final loss {facts['dit_final_loss']}" in card
    # --vae-from trains only the DiT, on the earlier run's VAE; here distilled from a teacher
    again = tmp_path / "again"
    assert cli_main(["train", "--out", str(again), "--vae-from", str(out), "--dit-steps", "2",
                     "--clips", "2", "--clip-frames", "21", "--teacher-steps", "2",
                     "--pairs", "3", "--solve-steps", "2", "--dit-batch", "1",
                     "--prompt-dropout", "0.5", "--guidance", "2"]) == 0  # fmt: skip
    assert "--teacher-steps 2 --pairs 3 --solve-steps 2" in (again / "MODEL_CARD.md").read_text()
    card = (again / "MODEL_CARD.md").read_text()
    assert "--dit-batch 1 " in card and "--prompt-dropout 0.5 --guidance 2.0" in card
    assert "guided 2.0x" in card and "learns at the top level" in card
    reused = load_components("toy", resolve_weights(again), device="cpu").vae.state_dict()
    assert all(torch.equal(v, components.vae.state_dict()[k]) for k, v in reused.items())
    assert json.loads((again / "facts.json").read_text())["vae_from"] == str(out)


def test_training_is_reproducible_from_its_seed() -> None:
    runs = [train_vae(SMALL_VAE, 3, seed=5, size=(32, 48), batch=1, frames=5, crop=32)
            for _ in range(2)]  # fmt: skip
    assert runs[0][1] == runs[1][1]
    a, b = (vae.state_dict() for vae, _ in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_vae(SMALL_VAE, 3, seed=6, size=(32, 48), batch=1, frames=5, crop=32)[1]
    assert other != runs[0][1]
