"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming decode, loader errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from histream_model.config import PRESETS, VAEConfig
from histream_model.vae import WanVAE, build_vae
from histream_model.weights.common import WeightsError
from histream_model.weights.vae import load_vae

TOL = 1e-4


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values in the norms' gammas and all biases too (conv weights are random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _tiny_diffusers(num_res_blocks: int, base_dim: int, dim_mult: list[int]) -> AutoencoderKLWan:
    torch.manual_seed(0)
    ref = AutoencoderKLWan(
        base_dim=base_dim, z_dim=16, dim_mult=dim_mult, num_res_blocks=num_res_blocks
    )
    _randomise(ref, seed=num_res_blocks)
    return ref.eval()


def _stats(ref: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _reference_decode(ref: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """diffusers decodes un-normalized latents; our VAE takes the DiT's normalized ones."""
    mean, std = _stats(ref)
    with torch.no_grad():
        return ref.decode(z * std + mean).sample


def to_original_key(key: str, num_res_blocks: int) -> str:
    """The test's own diffusers -> original `WanVAE_` renaming, from wan/modules/vae.py's tree.

    Residual blocks are `residual` Sequentials (norm 0, conv 2, norm 3, conv 6) plus `shortcut`;
    the middle is [resnet, attention, resnet]; the decoder's stages are flattened into one
    `upsamples` Sequential of (num_res_blocks + 1) resnets and one resampler per stage.
    """
    parts = {"norm1": "0", "conv1": "2", "norm2": "3", "conv2": "6"}
    key = re.sub(
        r"((?:resnets|down_blocks)\.\d+\.)(norm1|conv1|norm2|conv2)\.",
        lambda m: f"{m[1]}residual.{parts[m[2]]}.",
        key,
    )
    key = re.sub(r"((?:resnets|down_blocks)\.\d+\.)conv_shortcut\.", r"\1shortcut.", key)
    stage = num_res_blocks + 2
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"decoder.upsamples.{int(m[1]) * stage + int(m[2])}.",
        key,
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.upsamples.{int(m[1]) * stage + stage - 1}.",
        key,
    )
    for old, new in (
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ):
        key = re.sub(old, new, key)
    return key


@pytest.fixture(scope="module")
def ref1() -> AutoencoderKLWan:
    """Tiny diffusers VAE, one residual block per stage (REFERENCE 5)."""
    return _tiny_diffusers(num_res_blocks=1, base_dim=3, dim_mult=[1, 1, 1, 1])


@pytest.fixture(scope="module")
def ref1_dir(ref1: AutoencoderKLWan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("diffusers_vae")
    ref1.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae1(ref1_dir: Path) -> WanVAE:
    return load_vae(ref1_dir)


@pytest.fixture(scope="module")
def ref2() -> AutoencoderKLWan:
    """Two residual blocks per stage and Wan's channel ratios, so diffusers' own single-file
    converter (written for the real checkpoint's layout) can check the test's key mapping."""
    return _tiny_diffusers(num_res_blocks=2, base_dim=4, dim_mult=[1, 2, 4, 4])


@pytest.fixture(scope="module")
def original_pth(ref2: AutoencoderKLWan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = {to_original_key(k, 2): v.clone() for k, v in ref2.state_dict().items()}
    path = tmp_path_factory.mktemp("original_vae") / "Wan2.1_VAE.pth"
    torch.save(state, path)
    return path


def _latents(t: int, h: int = 3, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def _assert_not_saturated(frames: torch.Tensor) -> None:
    """A parity check on clamped output means little if everything sits at +-1."""
    assert (frames.abs() < 0.99).float().mean() > 0.5


def test_decode_matches_diffusers(ref1: AutoencoderKLWan, vae1: WanVAE) -> None:
    z = _latents(5)
    expected = _reference_decode(ref1, z)
    frames = vae1.decode(z)
    assert frames.shape == (1, 3, 17, 24, 40)
    _assert_not_saturated(expected)
    _assert_close(frames, expected)


def test_loads_a_diffusers_pipeline_folder(
    ref1: AutoencoderKLWan, vae1: WanVAE, tmp_path: Path
) -> None:
    ref1.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path)
    assert vae.config == vae1.config
    loaded, expected = vae.state_dict(), vae1.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_encode_matches_diffusers(ref1: AutoencoderKLWan, vae1: WanVAE) -> None:
    x = torch.rand(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = _stats(ref1)
    with torch.no_grad():
        mu = ref1.encode(x).latent_dist.mean
    latents = vae1.encode(x)
    assert latents.shape == (1, 16, 3, 3, 5)
    _assert_close(latents, (mu - mean) / std)


def test_test_key_mapping_agrees_with_diffusers_converter(ref2: AutoencoderKLWan) -> None:
    state = ref2.state_dict()
    original = {to_original_key(k, 2): v for k, v in state.items()}
    assert set(convert_wan_vae_to_diffusers(original)) == set(state)


@pytest.mark.parametrize("use_dir", [False, True], ids=["file", "folder"])
def test_original_checkpoint_matches_diffusers(
    ref2: AutoencoderKLWan, original_pth: Path, use_dir: bool
) -> None:
    vae = load_vae(original_pth.parent if use_dir else original_pth)
    assert vae.config == VAEConfig(base_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    z = _latents(5, h=4, w=3, seed=2)
    expected = _reference_decode(ref2, z)
    _assert_not_saturated(expected)
    _assert_close(vae.decode(z), expected)


def _chunks(z: torch.Tensor, sizes: list[int]) -> Iterator[torch.Tensor]:
    start = 0
    for size in sizes:
        yield z[:, :, start : start + size]
        start += size


@pytest.mark.parametrize("sizes", [[3, 3, 1], [1, 2, 2, 2], [1] * 7], ids=str)
def test_streaming_decode_equals_whole_clip(vae1: WanVAE, sizes: list[int]) -> None:
    z = _latents(7, seed=3)
    whole = vae1.decode(z)
    state = vae1.new_decode_state()
    parts = []
    for chunk in _chunks(z, sizes):
        frames, state = vae1.decode_chunk(chunk, state)
        parts.append(frames)
    assert [p.shape[2] for p in parts] == [
        4 * s - (3 if i == 0 else 0) for i, s in enumerate(sizes)
    ]
    assert state.latent_frames == 7
    _assert_close(torch.cat(parts, dim=2), whole, tol=1e-6)


def test_interleaved_streams_do_not_interfere(vae1: WanVAE) -> None:
    za, zb = _latents(6, seed=4), _latents(6, h=4, w=2, seed=5)
    states = {"a": vae1.new_decode_state(), "b": vae1.new_decode_state()}
    parts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for ca, cb in zip(_chunks(za, [3, 3]), _chunks(zb, [3, 3]), strict=True):
        for name, chunk in (("a", ca), ("b", cb)):
            frames, states[name] = vae1.decode_chunk(chunk, states[name])
            parts[name].append(frames)
    _assert_close(torch.cat(parts["a"], dim=2), vae1.decode(za), tol=1e-6)
    _assert_close(torch.cat(parts["b"], dim=2), vae1.decode(zb), tol=1e-6)


def test_decode_chunk_leaves_its_state_reusable(vae1: WanVAE) -> None:
    z = _latents(4, seed=6)
    _, state = vae1.decode_chunk(z[:, :, :2], vae1.new_decode_state())
    first, _ = vae1.decode_chunk(z[:, :, 2:], state)
    again, _ = vae1.decode_chunk(z[:, :, 2:], state)  # a retry from the same state
    assert torch.equal(first, again)


@pytest.fixture(scope="module")
def saturating_vae() -> WanVAE:
    """A random VAE whose output bias pushes red to +1 and green to -1, so the clamp acts."""
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(base_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1))
    with torch.no_grad():
        vae.decoder.head[2].bias[:2] = torch.tensor([5.0, -5.0])
    return vae


@pytest.mark.parametrize("t", [1, 2, 4])
def test_frame_count_and_range(saturating_vae: WanVAE, t: int) -> None:
    frames = saturating_vae.decode(_latents(t, seed=t))
    assert frames.shape == (1, 3, 1 + 4 * (t - 1), 24, 40)
    assert frames.shape[2] == saturating_vae.config.video_frames(t)
    assert frames.min() >= -1.0 and frames.max() <= 1.0
    assert (frames[:, 0] == 1.0).any() and (frames[:, 1] == -1.0).any()


def test_decode_rejects_bad_latents(vae1: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"\(1, 8, 2, 3, 5\)"):
        vae1.decode(torch.zeros(1, 8, 2, 3, 5))
    _, state = vae1.decode_chunk(_latents(1), vae1.new_decode_state())
    with pytest.raises(ValueError, match=r"\(1, 4, 5\).*\(1, 3, 5\)"):
        vae1.decode_chunk(_latents(1, h=4), state)


def test_encode_rejects_bad_frame_count(vae1: WanVAE) -> None:
    with pytest.raises(ValueError, match="has 4 frames"):
        vae1.encode(torch.zeros(1, 3, 4, 8, 8))


def _original_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_loader_reports_unexpected_key(original_pth: Path, tmp_path: Path) -> None:
    state = _original_state(original_pth)
    state["decoder.head.3.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys: \['decoder.head.3.weight'\]"):
        load_vae(tmp_path)


def test_loader_reports_missing_keys(original_pth: Path, tmp_path: Path) -> None:
    state = _original_state(original_pth)
    del state["decoder.middle.1.proj.bias"], state["encoder.head.0.gamma"]
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(WeightsError, match="missing keys") as info:
        load_vae(tmp_path / "vae.pth")
    assert "decoder.middle.1.proj.bias" in str(info.value)
    assert "encoder.head.0.gamma" in str(info.value)


def test_loader_reports_missing_diffusers_key(ref1: AutoencoderKLWan, tmp_path: Path) -> None:
    ref1.save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.up_blocks.1.upsamplers.0.resample.1.bias"]
    save_file(state, file)
    with pytest.raises(
        WeightsError, match=r"missing keys: \['decoder.upsamples.5.resample.1.bias'\]"
    ):
        load_vae(tmp_path)


def test_loader_names_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such" / "Wan2.1_VAE.pth"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        load_vae(missing)


def test_parameter_count_matches_wan21() -> None:
    """126,892,531 parameters: counted on diffusers' default (Wan2.1) AutoencoderKLWan."""
    with torch.device("meta"):
        ref = AutoencoderKLWan()
    vae = build_vae(PRESETS["wan2.1-1.3b"].vae, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == sum(p.numel() for p in ref.parameters())
    # Names and shapes too: diffusers' converter for the real checkpoint maps ours onto its own.
    converted = convert_wan_vae_to_diffusers(vae.state_dict())
    expected = ref.state_dict()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


def test_build_vae_is_deterministic() -> None:
    torch.manual_seed(7)
    a = build_vae(PRESETS["tiny"])
    torch.manual_seed(7)
    b = build_vae(PRESETS["tiny"].vae)
    assert a.config == PRESETS["tiny"].vae
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
