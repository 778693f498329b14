"""Session memory: what one session holds between chunks, against video length and at 1080p.

Measured: the bytes of the caches and text K/V a started session has allocated (they are
preallocated, so a session never grows), the `kv_bytes` every chunk of a long generation reports,
and the VAE decode state after two chunks (run on the meta device at 1080p: real shapes, no
memory). Each is checked against `histream_model.flops.session_bytes`.
"""

from __future__ import annotations

import torch

from bench.latency import Log, load
from bench.report import table
from histream_model.config import VAEConfig, get_preset
from histream_model.flops import dit_parameters, session_bytes
from histream_model.generator import HiStreamGenerator
from histream_model.vae import build_vae

LATENT_FRAMES = (21, 42, 84, 126, 168, 210)
GPU_BYTES = 80e9  # an 80 GB GPU (H100 / A100 80GB), decimal gigabytes
GB = 1e9


def _video_frames(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1)


def _held(state) -> int:
    """Bytes a started session holds: both caches and each resolution's text K/V."""
    texts = sum(r.text.nbytes for r in (state.low, state.high) if r is not None)
    return sum(state.kv_bytes().values()) + texts


def length_table(preset_name: str = "bench", log: Log | None = None) -> str:
    components, context = load(preset_name)
    preset = components.preset
    rows, agsw = [], []
    for latent in LATENT_FRAMES:
        frames = _video_frames(latent)
        row: list[object] = [latent, frames]
        for mode in ("histream", "no-agsw"):
            generator = HiStreamGenerator(components.dit, preset, mode)
            state = generator.start(context, preset.height, preset.width, frames)
            held = _held(state)
            model = sum(session_bytes(preset, mode, preset.height, preset.width, frames).values())
            if held != model:
                raise AssertionError(f"{mode} at {latent} latent frames: {held} != model {model}")
            row += [f"{held / 1e6:.1f}", f"{model / 1e6:.1f}"]
            if mode == "histream":
                agsw.append(held)
            del state
        rows.append(row)
        if log:
            log(f"  memory: {latent} latent frames allocated")
    spread = (max(agsw) - min(agsw)) / min(agsw)
    reported = _long_run_kv_bytes()
    return (
        f"**{preset_name}** preset ({preset.width}x{preset.height}, float32): bytes allocated by "
        "a started session (KV_low + KV_high + text K/V), against the FLOP/memory model.\n\n"
        + table(
            [
                "latent frames",
                "video frames",
                "AGSW (`histream`) MB measured",
                "model",
                "full history (`no-agsw`) MB measured",
                "model",
            ],
            rows,
        )
        + f"\n\nAGSW spread from {LATENT_FRAMES[0]} to {LATENT_FRAMES[-1]} latent frames: "
        f"{spread:.2%}. {reported}"
    )


def _long_run_kv_bytes() -> str:
    """Generate a whole 210-latent-frame video (tiny preset) and collect each chunk's kv_bytes."""
    components, context = load("tiny")
    preset = components.preset
    frames = _video_frames(LATENT_FRAMES[-1])
    generator = HiStreamGenerator(components.dit, preset, "histream+")
    reports = {
        tuple(c.kv_bytes.values())
        for c in generator.generate(context, preset.height, preset.width, frames)
    }
    chunks = LATENT_FRAMES[-1] // preset.options.chunk_frames
    (low, high), *others = sorted(reports)
    if others:
        raise AssertionError(f"kv_bytes changed during a long generation: {sorted(reports)}")
    return (
        f"A whole {frames}-frame `histream+` generation on the tiny preset reported the same "
        f"kv_bytes in all {chunks} chunks (low {low}, high {high})."
    )


def vae_state_bytes(config: VAEConfig, latent_hw: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the streaming decoder's state after two 3-frame chunks (meta device)."""
    vae = build_vae(config, device="meta", dtype=dtype)
    state = vae.new_decode_state()
    z = torch.zeros(1, config.z_dim, 3, *latent_hw, device="meta", dtype=dtype)
    for _ in range(2):
        _, state = vae.decode_chunk(z, state)
    return sum(h.nbytes for h in state.history if h is not None)


def capacity_table() -> str:
    preset = get_preset("wan2.1-1.3b")
    height, width, frames, elem = 1088, 1920, preset.num_frames, 2
    dtype = torch.bfloat16
    vae = build_vae(preset.vae, device="meta", dtype=dtype)
    weights = (dit_parameters(preset.dit) + sum(p.numel() for p in vae.parameters())) * elem
    spatial = preset.vae.spatial_stride
    vae_state = vae_state_bytes(preset.vae, (height // spatial, width // spatial), dtype)
    free = GPU_BYTES - weights
    rows = []
    long_frames = _video_frames(LATENT_FRAMES[-1])
    cases = [(m, frames) for m in ("histream", "histream+", "no-drc", "no-agsw", "self-forcing")]
    cases += [("histream", long_frames), ("self-forcing", long_frames)]
    for mode, length in cases:
        held = session_bytes(preset, mode, height, width, length, elem)
        dit_only = sum(held.values())
        rows.append(
            [
                f"`{mode}`",
                length,
                f"{held['kv_low'] / GB:.2f}",
                f"{held['kv_high'] / GB:.2f}",
                f"{held['text_kv'] / GB:.2f}",
                f"{dit_only / GB:.2f}",
                int(free // dit_only),
                f"{(dit_only + vae_state) / GB:.2f}",
                int(free // (dit_only + vae_state)),
            ]
        )
    return (
        f"**{preset.name}** at {width}x{height}, bf16 (model; the VAE state is "
        f"measured by running the real decoder on the meta device). Weights: DiT "
        f"{dit_parameters(preset.dit) / 1e9:.3f} B + VAE "
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M parameters = "
        f"{weights / GB:.2f} GB; {GPU_BYTES / GB:.0f} GB GPU. The streaming VAE decoder keeps "
        f"the last 2 input frames of every causal conv: {vae_state / GB:.2f} GB per session. "
        "Activation workspace of the running pass and the text encoder are not included.\n\n"
        + table(
            [
                "mode",
                "frames",
                "KV_low GB",
                "KV_high GB",
                "text K/V GB",
                "DiT state GB",
                "sessions / 80 GB",
                "+ VAE decode state GB",
                "sessions / 80 GB",
            ],
            rows,
        )
    )


def section(log: Log | None = None) -> str:
    return length_table(log=log) + "\n\n" + capacity_table()
