"""Cross-session batching in process: what the denoising stages gain, apart from decoding.

N sessions of one mode and size advance in lockstep, chunk by chunk and phase by phase; each
phase runs either once per session (`run_phase`, batching off) or once for all of them
(`run_phase_batch`, as the stages' `PhaseBatcher` runs it with `phase_batch_size` >= N). No
decode, no service: the aggregate denoising throughput (all sessions' frames over the wall time)
of one denoiser on this machine's cores. Off and on alternate per repeat; medians are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from bench.latency import Log, load
from bench.report import table
from histream_model.config import get_mode
from histream_model.schedules import handoff, new_session_states, plan_chunk, run_chunk
from histream_model.schedules.execute import BatchMember, run_phase_batch
from histream_model.shape import VideoShape

MODE = "histream+"
COUNTS = (1, 2, 4, 8, 16)
HEADERS = ("sessions", "frames/s, batching off", "frames/s, batching on", "on / off")


def run_sessions(
    components, context, count: int, frames: int, batched: bool
) -> tuple[float, list[list[torch.Tensor]]]:
    """Seconds for `count` sessions of `frames` frames, every phase batched or one by one, and
    each session's chunk latents (session i draws its noise from seed i)."""
    preset = components.preset
    shape = VideoShape(preset, get_mode(MODE), preset.height, preset.width, frames)
    sessions = [new_session_states(components.dit, shape, context) for _ in range(count)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(count)]
    started = time.perf_counter()
    for chunk in range(shape.num_chunks):
        plan = plan_chunk(shape, chunk)
        if not batched:  # one session's chunk after another's, as a replica runs them alone
            for seed, states in enumerate(sessions):
                outputs[seed].append(run_chunk(components.dit, states, shape, plan, seed))
            continue
        received = [None] * count
        for index, phase in enumerate(plan.phases):
            members = [
                BatchMember(states[phase.cache], plan, seed, received[seed])
                for seed, states in enumerate(sessions)
            ]
            results = run_phase_batch(components.dit, members, index, preset.options)
            if index == plan.output:
                for kept, result in zip(outputs, results, strict=True):
                    kept.append(result.latents)
            if index + 1 < len(plan.phases):
                following = plan.phases[index + 1]
                received = [handoff(shape, following, r.latents) for r in results]
    return time.perf_counter() - started, outputs


def section(
    preset_name: str,
    frames: int,
    repeats: int,
    counts: Sequence[int] = COUNTS,
    log: Log | None = None,
) -> str:
    components, context = load(preset_name)
    preset = components.preset
    run_sessions(components, context, 1, 9, batched=True)  # warm-up
    rows = []
    for count in counts:
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats):
            for batched in (False, True):
                seconds[batched].append(
                    run_sessions(components, context, count, frames, batched)[0]
                )
            if log:
                log(f"  batching N={count} repeat {repeat + 1}/{repeats}: "
                    f"off {seconds[False][-1]:.1f} s, on {seconds[True][-1]:.1f} s")  # fmt: skip
        off, on = (count * frames / statistics.median(seconds[b]) for b in (False, True))
        rows.append([count, f"{off:.1f}", f"{on:.1f}", f"{on / off:.2f}x"])
    return (
        f"**{preset_name}** preset ({preset.width}x{preset.height}), `{MODE}`, {frames} frames "
        f"per session, {repeats} repeat(s) alternating off and on, medians; denoising only "
        "(no decode), in one process on this machine's cores:\n\n" + table(HEADERS, rows)
    )
