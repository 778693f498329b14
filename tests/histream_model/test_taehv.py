"""The TAEHV-layout tiny decoder: layout and size, streaming against a frame-by-frame reference,
resuming a stream, loading `taew2_1` checkpoints, and choosing it as the decoder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from histream_model.components import decoder_for, load_components, resolve_weights
from histream_model.config import get_preset
from histream_model.taehv import TAEHV, MemBlock, TAEHVConfig, TGrow, build_taehv
from histream_model.vae import WanVAE, build_vae
from histream_model.weights.common import WeightsError
from histream_model.weights.vae import load_vae

SMALL = TAEHVConfig(channels=(24, 16, 8), encoder_channels=8, with_encoder=True)


def small_model(seed: int = 0, config: TAEHVConfig = SMALL) -> TAEHV:
    torch.manual_seed(seed)
    model = build_taehv(config)
    with torch.no_grad():  # biases too, so that every path carries signal
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
        model.decoder[-1].bias.add_(0.5)  # outputs around the middle of [0, 1], not clamped
    return model


def reference_decode(model: TAEHV, z: torch.Tensor) -> torch.Tensor:
    """The decoder run one frame at a time, written from the architecture's description: each
    memory block remembers its last input frame, a TGrow splits a frame's channels into
    consecutive frames, the first 3 output frames are dropped, [0, 1] maps to [-1, 1]."""
    layers = list(model.decoder)
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def push(i: int, x: torch.Tensor) -> None:
        if i == len(layers):
            out.append(x)
            return
        layer = layers[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            push(i + 1, layer(x, past))
        elif isinstance(layer, TGrow):
            y = layer.conv(x)
            c = x.shape[1]
            for k in range(layer.stride):
                push(i + 1, y[:, k * c : (k + 1) * c])
        else:
            push(i + 1, layer(x))

    with torch.no_grad():
        for t in range(z.shape[2]):
            push(0, z[:, :, t])
    frames = torch.stack(out, dim=2)[:, :, 3:]
    return frames.clamp(0, 1) * 2 - 1


def test_the_layout_and_size_are_taew2_1s() -> None:
    """About 9.9 M decoder and 11.3 M parameters in all (REFERENCE 8), under the checkpoint's
    names: `decoder.<index>` of one Sequential."""
    with torch.device("meta"):
        model = TAEHV(TAEHVConfig(with_encoder=True))
    count = sum(p.numel() for p in model.decoder.parameters())
    assert 9.7e6 < count < 10.0e6
    assert 11.2e6 < sum(p.numel() for p in model.parameters()) < 11.4e6
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["decoder.1.weight"] == (256, 16, 3, 3)
    assert shapes["decoder.3.conv.0.weight"] == (256, 512, 3, 3)  # cat[x, past]
    assert shapes["decoder.7.conv.weight"] == (256, 256, 1, 1)  # TGrow(256, 1)
    assert shapes["decoder.13.conv.weight"] == (256, 128, 1, 1)  # TGrow(128, 2)
    assert shapes["decoder.19.conv.weight"] == (128, 64, 1, 1)  # TGrow(64, 2)
    assert shapes["decoder.22.weight"] == (3, 64, 3, 3)
    assert "decoder.8.bias" not in shapes and "decoder.22.bias" in shapes
    assert shapes["encoder.2.conv.weight"] == (64, 128, 1, 1)  # TPool(64, 2)
    assert shapes["encoder.17.weight"] == (16, 64, 3, 3)
    assert model.config.temporal_stride == 4 and model.config.receptive_latent_frames == 8


def test_whole_and_streamed_decodes_equal_the_frame_by_frame_reference() -> None:
    model = small_model()
    z = torch.randn(2, 16, 7, 4, 6)
    reference = reference_decode(model, z)
    whole = model.decode(z)
    assert whole.shape == (2, 3, 1 + 4 * 6, 32, 48)
    assert reference.shape == whole.shape
    assert whole.std() > 0.05  # not a saturated constant
    torch.testing.assert_close(whole, reference, atol=1e-6, rtol=0)
    state, parts = model.new_decode_state(), []
    for a, b in ((0, 1), (1, 4), (4, 5), (5, 7)):
        frames, state = model.decode_chunk(z[:, :, a:b], state)
        assert frames.shape[2] == (1 if a == 0 else 4 * (b - a))
        parts.append(frames)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-6, rtol=0)
    assert state.latent_frames == 7


def test_a_stream_resumed_from_its_last_8_latent_frames_goes_on_exactly() -> None:
    model = small_model(1)
    z = torch.randn(1, 16, 14, 4, 4)
    _, state = model.decode_chunk(z[:, :, :11], model.new_decode_state())
    later = z[:, :, 11:]
    expected, _ = model.decode_chunk(later, state)
    k = model.config.receptive_latent_frames
    resumed = model.resume_decode_state(z[:, :, 11 - k : 11], 11 - k)
    assert resumed.latent_frames == 11
    got, _ = model.decode_chunk(later, resumed)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decoded_before=-1"):
        model.resume_decode_state(z[:, :, :2], -1)


def test_bad_latents_are_refused_naming_the_shape() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"\(B, 16, T, h, w\).*\(1, 8, 2, 4, 4\)"):
        model.decode(torch.zeros(1, 8, 2, 4, 4))
    _, state = model.decode_chunk(torch.zeros(1, 16, 1, 4, 4), model.new_decode_state())
    with pytest.raises(ValueError, match=r"\(1, 4, 6\) does not match the stream's \(1, 4, 4\)"):
        model.decode_chunk(torch.zeros(1, 16, 1, 4, 6), state)


def test_the_encoder_gives_one_latent_frame_per_four_video_frames() -> None:
    model = small_model()
    latents = model.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1)
    assert latents.shape == (1, 16, 3, 4, 4)
    decode_only = small_model(config=TAEHVConfig(channels=(24, 16, 8)))
    assert decode_only.encoder is None
    with pytest.raises(ValueError, match="no encoder"):
        decode_only.encode(torch.zeros(1, 3, 5, 32, 32))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_vae_recognises_a_taehv_checkpoint(tmp_path: Path, suffix: str) -> None:
    model = small_model(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"taew2_1{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_vae(path)
    assert isinstance(loaded, TAEHV) and loaded.config == SMALL
    z = torch.randn(1, 16, 3, 4, 4)
    torch.testing.assert_close(loaded.decode(z), model.decode(z), atol=0, rtol=0)


def test_a_decoder_only_checkpoint_loads(tmp_path: Path) -> None:
    model = small_model(3)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    save_file(state, tmp_path / "taew2_1.safetensors")
    loaded = load_vae(tmp_path)  # a folder holding the one file
    assert isinstance(loaded, TAEHV) and loaded.encoder is None
    z = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(loaded.decode(z), model.decode(z), atol=0, rtol=0)


def test_missing_and_extra_keys_are_listed(tmp_path: Path) -> None:
    state = dict(small_model().state_dict())
    del state["decoder.10.conv.2.bias"]
    state["decoder.23.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "taew2_1.safetensors")
    with pytest.raises(WeightsError) as info:
        load_vae(tmp_path / "taew2_1.safetensors")
    message = str(info.value)
    assert "missing keys: ['decoder.10.conv.2.bias']" in message
    assert "unexpected keys: ['decoder.23.weight']" in message
    del state["decoder.13.conv.weight"]
    save_file(state, tmp_path / "taew2_1.safetensors")
    with pytest.raises(WeightsError, match=re.escape("no 'decoder.13.conv.weight'")):
        load_vae(tmp_path / "taew2_1.safetensors")


def test_decoder_for_picks_and_checks_the_decoder(tmp_path: Path) -> None:
    tiny = get_preset("tiny")
    assert isinstance(decoder_for(tiny, "wan", device="cpu"), WanVAE)
    random_taehv = decoder_for(tiny, "taehv", device="cpu")  # a random preset: a random one
    assert isinstance(random_taehv, TAEHV) and random_taehv.config == TAEHVConfig()
    with pytest.raises(ValueError, match=r"decoder='vq' is not one of \['wan', 'taehv'\]"):
        decoder_for(tiny, "vq")
    # Operator weights: a taew2_1 beside them is found; without one, taehv is refused.
    weights = tmp_path / "weights"
    (weights / "transformer").mkdir(parents=True)
    save_file(dict(build_vae(tiny).state_dict()), weights / "Wan2.1_VAE.safetensors")
    (weights / "vae").mkdir()
    save_file(dict(build_vae(tiny).state_dict()), weights / "vae" / "Wan2.1_VAE.safetensors")
    paths = resolve_weights(weights)
    assert paths.tiny_decoder is None
    with pytest.raises(WeightsError, match="decoder 'taehv' needs a TAEHV-layout checkpoint"):
        decoder_for(tiny, "taehv", paths, device="cpu")
    save_file(dict(small_model().state_dict()), weights / "taew2_1.safetensors")
    paths = resolve_weights(weights)
    assert paths.tiny_decoder == weights / "taew2_1.safetensors"
    assert decoder_for(tiny, "taehv", paths, device="cpu").config == SMALL
    # A checkpoint of the other kind, or of another latent width, is refused.
    with pytest.raises(WeightsError, match="hold a 'wan' decoder, not 'taehv'"):
        decoder_for(tiny, "taehv", decoder_weights=weights / "vae", device="cpu")
    narrow = small_model(config=TAEHVConfig(latent_channels=8, channels=(8, 8, 8)))
    save_file(dict(narrow.state_dict()), tmp_path / "narrow.safetensors")
    with pytest.raises(WeightsError, match="decode 8 latent channels; preset 'tiny' makes 16"):
        decoder_for(tiny, "taehv", decoder_weights=tmp_path / "narrow.safetensors")


def test_components_with_the_tiny_decoder_keep_the_presets_vae_config() -> None:
    c = load_components("tiny", device="cpu", decoder="taehv")
    assert isinstance(c.vae, TAEHV)
    assert c.preset.vae == get_preset("tiny").vae
