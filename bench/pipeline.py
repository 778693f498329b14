"""Pipelined HiAR vs sequential HiAR on this machine, and what the same arithmetic predicts
for one GPU per step at 1080p.

One session at a time, `PipelinedRun` (histream_model/schedules/pipeline.py) with 1 worker (the
sequential run) or 2 workers (steps 1-2 | steps 3-4), each worker a thread with its own torch
thread count; repeats interleave the configurations. Reported: chunks per second over the whole
video and the time to its first chunk (median over repeats).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import latency
from bench.report import table
from histream_model.config import get_mode, get_preset
from histream_model.flops import chunk_passes
from histream_model.schedules import new_session_states, plan_chunk
from histream_model.schedules.pipeline import PipelinedRun
from histream_model.shape import VideoShape

# (label, workers, torch threads per worker)
CONFIGS = [
    ("sequential, 1 worker x 1 thread", 1, 1),
    ("sequential, 1 worker x 2 threads", 1, 2),
    ("pipelined, 2 workers x 1 thread", 2, 1),
]
GPU_HIAR = 0.426  # s/frame, `hiar` on one H100 at 1920x1088 (BENCHMARKS.md, bench.gpu)


def _run(components, context, mode: str, frames: int, workers: int, threads: int):
    preset = components.preset
    shape = VideoShape(preset, get_mode(mode), preset.height, preset.width, frames)
    plans = [plan_chunk(shape, i) for i in range(shape.num_chunks)]
    states = new_session_states(components.dit, shape, context)
    run = PipelinedRun(components.dit, states, shape, 0, workers, plans, threads)
    started = time.perf_counter()
    first = None
    for _ in run:
        first = first if first is not None else time.perf_counter() - started
    total = time.perf_counter() - started
    return shape.num_chunks / total, first


def predicted_speedup(num_chunks: int, workers: int) -> float:
    """Sequential time over pipelined time with equal steps: N S micro-steps against S + N - 1
    (the wavefront fills in S - 1, then a chunk leaves every micro-step)."""
    return num_chunks * workers / (workers + num_chunks - 1)


def section(preset_name: str, frames: int, repeats: int, log=None) -> str:
    components, context = latency.load(preset_name)
    saved = torch.get_num_threads()
    rows = []
    modes = ("hiar", "histream-hiar")
    results = {(m, c[0]): [] for m in modes for c in CONFIGS}
    try:
        for mode in modes:
            _run(components, context, mode, 9, 1, 1)  # warm-up
        for repeat in range(repeats):
            for mode in modes:
                for label, workers, threads in CONFIGS:
                    results[mode, label].append(
                        _run(components, context, mode, frames, workers, threads)
                    )
            if log:
                log(f"  pipeline repeat {repeat + 1}/{repeats}")
    finally:
        torch.set_num_threads(saved)
    for mode in modes:
        base = statistics.median(r[0] for r in results[mode, CONFIGS[0][0]])
        for label, _, _ in CONFIGS:
            rate = statistics.median(r[0] for r in results[mode, label])
            first = statistics.median(r[1] for r in results[mode, label])
            rows.append([f"`{mode}`", label, f"{rate:.3f}", f"{rate / base:.2f}x", f"{first:.2f}"])
    preset = components.preset
    shape = VideoShape(preset, get_mode("hiar"), preset.height, preset.width, frames)
    n = shape.num_chunks
    big = VideoShape(get_preset("wan2.1-1.3b"), get_mode("hiar"), 1088, 1920, 81)
    steps = [p.flops for p in chunk_passes(big, 1)]
    per_step = [steps[i] + steps[i + 1] for i in range(0, len(steps), 2)]
    balance = max(per_step) / (sum(per_step) / len(per_step))
    chunks_1080 = big.num_chunks
    pipe4 = predicted_speedup(chunks_1080, 4) / balance
    seq_s = GPU_HIAR * big.num_frames
    headers = ["mode", "configuration", "chunks/s", "vs 1 x 1", "time to first chunk (s)"]
    return (
        f"**{preset_name}** preset, {frames} frames ({n} chunks), one session, {repeats} "
        "repeats interleaved; medians.\n\n"
        + table(headers, rows)
        + f"\n\nThe same arithmetic for 4 GPUs at 1920x1088 (81 frames, {chunks_1080} chunks): "
        f"a step's passes are equal in FLOPs to within {balance - 1:.1%} (FLOP model), so the "
        f"wavefront takes 4 + {chunks_1080} - 1 = {3 + chunks_1080} micro-steps against "
        f"{4 * chunks_1080} sequential: {pipe4:.2f}x, {seq_s:.1f} s -> {seq_s / pipe4:.1f} s "
        f"for the video on H100s (one H100 ran `hiar` at {GPU_HIAR} s/frame), with the "
        "first chunk no sooner (all four steps still run in turn), then one chunk per "
        f"micro-step; in a stream of many chunks the gain tends to 4x. Not measured: this "
        "task had one GPU."
    )
