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
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import latency
from bench.batching import run_sessions
from bench.report import table
from bench.table2 import BASELINE, MODES, PAPER_A100, PAPER_H100, paper_row
from histream_model import build_dit, build_vae
from histream_model.attention import backend_for
from histream_model.config import get_preset
from histream_model.flops import video_flops
from histream_model.taehv import build_taehv

PRESET, HEIGHT, WIDTH, FRAMES = "wan2.1-1.3b", 1088, 1920, 81
BATCH_HEIGHT, BATCH_WIDTH = 480, 832
PARTS = ["table2", "decode", "batching"]
PAPER_VAE_H100 = 9.40 / 81  # s/frame: the paper's VAE decode of 81 frames at 1080p on an H100


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def decode_seconds_per_frame(decoder, device: str, dtype: torch.dtype) -> float:
    """A streaming decoder decoding a 21-latent-frame stream at 1080p, 3 latent frames per
    call (after one warm-up call)."""
    z = torch.randn(1, 16, 21, HEIGHT // 8, WIDTH // 8, device=device, dtype=dtype)
    state = decoder.new_decode_state()
    decoder.decode_chunk(z[:, :, :3], state)  # warm-up
    torch.cuda.synchronize()
    state, frames = decoder.new_decode_state(), 0
    started = time.perf_counter()
    for i in range(0, 21, 3):
        out, state = decoder.decode_chunk(z[:, :, i : i + 3], state)
        frames += out.shape[2]
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / frames


def batching_seconds(
    dit, context: torch.Tensor, counts: list[int], frames: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds of N lockstep `histream+` sessions at 832x480 (the usual real-time size), every
    phase once per session or batched across them (`bench.batching`), off and on alternating."""
    preset = replace(get_preset(PRESET), height=BATCH_HEIGHT, width=BATCH_WIDTH)
    models = SimpleNamespace(preset=preset, dit=dit)

    def timed(count: int, batched: bool) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        run_sessions(models, context, count, frames, batched)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(1, True)  # warm-up
    out: dict[str, dict[str, list[float]]] = {}
    for count in counts:
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(repeats):
            for name, batched in (("off", False), ("on", True)):
                runs[name].append(timed(count, batched))
        _log(f"batching N={count}: off {runs['off']}, on {runs['on']}")
        out[str(count)] = runs
    return out


def measure(
    repeats: int, modes: list[str], parts: list[str], counts: list[int], frames: int
) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    device, dtype = "cuda", torch.bfloat16
    preset = get_preset(PRESET)
    dit = build_dit(preset, device=device, dtype=dtype)
    context = torch.randn(1, preset.dit.text_len, preset.dit.text_dim, device=device, dtype=dtype)
    probe = torch.zeros(1, 8, 2, 64, device=device, dtype=dtype)
    result: dict = {
        "measured_at": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attention": backend_for(probe),
    }
    if "table2" in parts:
        result["samples"] = latency.measure_model(
            dit, preset, context, modes, repeats, FRAMES, _log, interleave=False
        )
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    if "batching" in parts:
        result["batching"] = {
            "size": f"{BATCH_WIDTH}x{BATCH_HEIGHT}",
            "frames": frames,
            "seconds": batching_seconds(dit, context, counts, frames, repeats),
        }
    del dit
    torch.cuda.empty_cache()
    if "decode" in parts:
        vae = build_vae(preset.vae).to(device=device, dtype=dtype)
        result["decode_s_per_frame"] = decode_seconds_per_frame(vae, device, dtype)
        del vae
        tiny = build_taehv(device=device, dtype=dtype)
        result["taehv_decode_s_per_frame"] = decode_seconds_per_frame(tiny, device, dtype)
    return result


def section(paths: list[str]) -> str:
    every = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for r in every if "samples" in r]
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
    decode = statistics.median(r["decode_s_per_frame"] for r in every if "decode_s_per_frame" in r)
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
        + extras(every, {m: statistics.median(v) for m, v in samples.items()})
    )


def extras(runs: list[dict], table2: dict[str, float]) -> str:
    """The tiny decoder's decode time and cross-session batching, from runs that measured them."""
    out = ""
    tiny = [r["taehv_decode_s_per_frame"] for r in runs if "taehv_decode_s_per_frame" in r]
    wan = [r["decode_s_per_frame"] for r in runs if "taehv_decode_s_per_frame" in r]
    if tiny:
        t, w, plus = statistics.median(tiny), statistics.median(wan), table2.get("histream+")
        out += (
            f" The TAEHV-layout tiny decoder (random weights), same stream: {t:.4f} s/frame, "
            f"{w / t:.1f}x faster than the Wan VAE in the same run ({w:.3f})"
        )
        if plus:
            out += (
                f"; beside `histream+`'s denoising ({plus:.3f} s/frame) decoding is then "
                f"{t / (t + plus):.1%} of a frame's time, against {w / (w + plus):.0%} with "
                "the Wan VAE"
            )
        out += "."
    batched = [r for r in runs if "batching" in r]
    if batched:
        b = batched[-1]["batching"]
        rows = []
        for count, runs_ in b["seconds"].items():
            n = int(count)
            off, on = (n * b["frames"] / statistics.median(runs_[k]) for k in ("off", "on"))
            rows.append([n, f"{off:.1f}", f"{on:.1f}", f"{on / off:.2f}x"])
        out += (
            f"\n\nCross-session batching on the GPU (`python -m bench.gpu --parts batching`): "
            f"N `histream+` sessions of {b['frames']} frames at {b['size']} in lockstep, the "
            "1.3B sizes, every phase once per session (off) or once for all (on, as the stages' "
            "`PhaseBatcher` runs it); denoising only, medians:\n\n"
            + table(["sessions", "frames/s, off", "frames/s, on", "on / off"], rows)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the samples (JSON)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="what to measure")
    parser.add_argument("--batching-counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batching-frames", type=int, default=45)
    args = parser.parse_args(argv)
    result = measure(
        args.repeats, args.modes, args.parts, args.batching_counts, args.batching_frames
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    _log(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
