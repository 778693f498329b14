"""Table 2 on a GPU: every mode's per-frame denoising latency at the paper's size (Wan2.1-1.3B
sizes, 1920x1088, 81 frames, bf16, random weights: latency does not depend on their values),
and the streaming VAE's per-frame decode time at that size.

Two halves, because the GPU is lent elsewhere: `python -m bench.gpu --out F.json` measures on
the CUDA machine (each mode's video whole in turn: every mode's 1080p caches at once do not fit
on one GPU), and
`python -m bench --sections table2-gpu --gpu-json F.json ...` renders the table here from one or
more such files (their repeats pooled).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import latency
from bench.report import table
from bench.table2 import BASELINE, MODES, PAPER_A100, PAPER_H100, paper_row
from histream_model import build_dit, build_vae
from histream_model.attention import backend_for
from histream_model.config import get_preset
from histream_model.flops import video_flops

PRESET, HEIGHT, WIDTH, FRAMES = "wan2.1-1.3b", 1088, 1920, 81
PAPER_VAE_H100 = 9.40 / 81  # s/frame: the paper's VAE decode of 81 frames at 1080p on an H100


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def decode_seconds_per_frame(device: str, dtype: torch.dtype) -> float:
    """The Wan VAE decoding a 21-latent-frame stream at 1080p, 3 latent frames per call."""
    preset = get_preset(PRESET)
    vae = build_vae(preset.vae).to(device=device, dtype=dtype)
    z = torch.randn(1, 16, 21, HEIGHT // 8, WIDTH // 8, device=device, dtype=dtype)
    state = vae.new_decode_state()
    vae.decode_chunk(z[:, :, :3], state)  # warm-up
    torch.cuda.synchronize()
    state, frames = vae.new_decode_state(), 0
    started = time.perf_counter()
    for i in range(0, 21, 3):
        out, state = vae.decode_chunk(z[:, :, i : i + 3], state)
        frames += out.shape[2]
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / frames


def measure(repeats: int, modes: list[str]) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    device, dtype = "cuda", torch.bfloat16
    preset = get_preset(PRESET)
    dit = build_dit(preset, device=device, dtype=dtype)
    context = torch.randn(1, preset.dit.text_len, preset.dit.text_dim, device=device, dtype=dtype)
    probe = torch.zeros(1, 8, 2, 64, device=device, dtype=dtype)
    samples = latency.measure_model(
        dit, preset, context, modes, repeats, FRAMES, _log, interleave=False
    )
    peak = torch.cuda.max_memory_allocated()
    del dit
    torch.cuda.empty_cache()
    return {
        "measured_at": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attention": backend_for(probe),
        "samples": samples,
        "peak_bytes": peak,
        "decode_s_per_frame": decode_seconds_per_frame(device, dtype),
    }


def section(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    samples: dict[str, list[float]] = {}
    for run in runs:
        for mode, values in run["samples"].items():
            samples.setdefault(mode, []).extend(values)
    modes = [m for m in MODES if m in samples]
    preset = get_preset(PRESET)
    model = {m: video_flops(preset, m, HEIGHT, WIDTH, FRAMES) for m in modes}
    base = statistics.median(samples[BASELINE])
    paper_base = PAPER_A100[BASELINE][1]
    rows = []
    for mode in modes:
        med = statistics.median(samples[mode])
        measured, predicted = base / med, model[BASELINE].total / model[mode].total
        name, paper = paper_row(mode)
        h100 = PAPER_H100.get(mode)
        rows.append(
            [
                f"`{mode}` ({name})",
                f"{med:.3f}",
                f"{min(samples[mode]):.3f}-{max(samples[mode]):.3f}",
                f"{model[mode].per_frame / med / 1e12:.0f}",
                f"{measured:.2f}x",
                f"{predicted:.2f}x",
                f"{measured / predicted:.2f}",
                f"{paper:.2f} ({paper_base / paper:.2f}x)" if paper else "",
                f"{h100:.2f}" if h100 else "",
            ]
        )
    headers = [
        "mode (paper row)",
        "median s/frame",
        "min-max",
        "achieved TFLOP/s",
        "measured speedup",
        "FLOP-model speedup",
        "measured / model",
        "paper A100 s/frame (speedup)",
        "paper H100 s/frame",
    ]
    first = runs[0]
    decode = statistics.median(r["decode_s_per_frame"] for r in runs)
    n = len(samples[BASELINE])
    dates = sorted({r.get("measured_at", "?") for r in runs})
    return (
        f"Measured {', '.join(dates)} on one {first['device']} with `python -m bench.gpu` "
        f"({len(runs)} run(s): {', '.join(paths)}); rendered with `python -m bench --sections "
        f"table2-gpu --gpu-json {' '.join(paths)}`.\n\n"
        f"**{PRESET}** sizes with random bf16 weights (torch "
        f"{first['torch']}, attention through `{first['attention']}`), {WIDTH}x{HEIGHT}, "
        f"{FRAMES} frames, {n} repeat(s), each mode's video whole in turn; the "
        f"peak GPU memory of a repeat was {first['peak_bytes'] / 1e9:.1f} GB.\n\n"
        + table(headers, rows)
        + f"\n\nStreaming Wan VAE decode at {WIDTH}x{HEIGHT}: {decode:.3f} s/frame (paper, "
        f"H100: {PAPER_VAE_H100:.3f})."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the samples (JSON)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    args = parser.parse_args(argv)
    result = measure(args.repeats, args.modes)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _log(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
