"""The two streaming decoders side by side: the Wan VAE's and the TAEHV-layout tiny one.

At the paper's size (1920x1088, bf16) by the model: each decoder runs on the meta device under
torch's FLOP counter (real shapes, no arithmetic), giving FLOPs per video frame, the floor at an
H100's dense bf16 peak and the bytes of one session's stream state. On this machine, measured:
the preset's whole pipeline (denoise + decode + H.264 encode, `breakdown.run_video`) with each
decoder, repeats interleaved, giving decode seconds per frame and the decode share of a chunk.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.breakdown import run_video
from bench.latency import Log, load
from bench.real_flops import HEIGHT, PEAK_H100, PRESET, WIDTH
from bench.report import table
from histream_model.components import DECODERS, StreamDecoder, decoder_for
from histream_model.config import get_preset
from histream_model.taehv import TAEHV, build_taehv
from histream_model.vae import build_vae

MODE = "histream+"
MODEL_HEADERS = ("size", "decoder", "decoder parameters", "TFLOP/frame", "floor s/frame H100",
                 "stream state MiB", "fewer FLOPs than Wan2.1's")  # fmt: skip
MEASURED_HEADERS = ("decoder", "decode s/frame", "decode speedup", "decode share of a chunk",
                    "pipeline s/frame")  # fmt: skip


def state_bytes(decoder: StreamDecoder, state) -> int:
    held = state.pasts if isinstance(decoder, TAEHV) else state.history
    return sum(t.nbytes for t in held if t is not None)


def model_rows(bench_preset: str) -> list[list[object]]:
    """Per decoder and size: parameters, TFLOP per frame, H100 floor, stream state (bf16).
    At 1920x1088 and at the `bench_preset`'s size: Wan2.1's VAE decoder against TAEHV, and the
    bench preset's own (shrunken, random-weight) VAE, which the CPU rows below time."""
    real, small = get_preset(PRESET), get_preset(bench_preset)
    dtype = torch.bfloat16
    cases = [
        (f"{WIDTH}x{HEIGHT}", (HEIGHT, WIDTH), "wan (Wan2.1 VAE)",
         build_vae(real.vae, "meta", dtype)),
        (f"{WIDTH}x{HEIGHT}", (HEIGHT, WIDTH), "taehv", build_taehv(device="meta", dtype=dtype)),
        (f"{small.width}x{small.height}", (small.height, small.width), "wan (Wan2.1 VAE)",
         build_vae(real.vae, "meta", dtype)),
        (f"{small.width}x{small.height}", (small.height, small.width), "taehv",
         build_taehv(device="meta", dtype=dtype)),
        (f"{small.width}x{small.height}", (small.height, small.width),
         f"wan (`{bench_preset}` preset's VAE, base {small.vae.base_dim})",
         build_vae(small.vae, "meta", dtype)),
    ]  # fmt: skip
    rows, reference = [], {}
    for size, (height, width), name, decoder in cases:
        hw = (height // 8, width // 8)
        z = torch.zeros(1, real.vae.z_dim, 3, *hw, device="meta", dtype=dtype)
        _, state = decoder.decode_chunk(z[:, :, :1], decoder.new_decode_state())
        with FlopCounterMode(display=False) as counter:
            _, state = decoder.decode_chunk(z, state)  # a later chunk: 12 frames
        flops = counter.get_total_flops() / (4 * z.shape[2])
        reference.setdefault(size, flops)  # the Wan2.1 VAE's, first at each size
        parts = (
            [decoder.decoder] if isinstance(decoder, TAEHV) else [decoder.conv2, decoder.decoder]
        )
        params = sum(p.numel() for part in parts for p in part.parameters())
        rows.append([
            size, f"`{name}`" if " " not in name else name, f"{params / 1e6:.1f} M",
            f"{flops / 1e12:.3f}", f"{flops / PEAK_H100:.4f}",
            f"{state_bytes(decoder, state) / 2**20:.0f}", f"{reference[size] / flops:.1f}x",
        ])  # fmt: skip
    return rows


def section(preset_name: str, repeats: int, num_frames: int, log: Log | None = None) -> str:
    components, context = load(preset_name)
    preset = components.preset
    decoders = {name: decoder_for(preset, name, device="cpu") for name in DECODERS}
    runs = {name: replace(components, vae=decoder) for name, decoder in decoders.items()}
    run_video(runs["taehv"], context, MODE, 9)  # warm-up
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in DECODERS}
    for repeat in range(repeats):
        for name in DECODERS:
            samples[name].append(run_video(runs[name], context, MODE, num_frames))
            if log:
                log(f"  decoders repeat {repeat + 1}/{repeats} {name}: "
                    f"decode {samples[name][-1]['vae_decode']:.1f} s")  # fmt: skip
    measured = []
    decode = {n: statistics.median(r["vae_decode"] for r in samples[n]) for n in DECODERS}
    for name in DECODERS:
        share = statistics.median(r["vae_decode"] / sum(r.values()) for r in samples[name])
        rows = samples[name]
        chunk = statistics.median(sum(r.values()) for r in rows) / num_frames
        measured.append([
            f"`{name}`", f"{decode[name] / num_frames:.4f}", f"{decode['wan'] / decode[name]:.1f}x",
            f"{share:.0%}", f"{chunk:.4f}",
        ])  # fmt: skip
    return (
        "By the model, bf16 (each decoder run on the meta device under torch's FLOP counter; "
        "the floor is the FLOPs at an H100's dense bf16 peak; stream state: one session's "
        "decoder memory after a chunk):\n\n"
        + table(MODEL_HEADERS, model_rows(preset_name))
        + f"\n\nMeasured here: **{preset_name}** preset ({preset.width}x{preset.height}, "
        f"`{MODE}`, {num_frames} frames, {repeats} interleaved repeat(s), median; random "
        "weights, which cost what trained ones do), the whole chunk pipeline (denoise, "
        "decode, H.264 encode) with each decoder:\n\n" + table(MEASURED_HEADERS, measured)
    )
