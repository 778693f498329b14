"""Durability: what keeping sessions restorable costs, and what a restore costs.

- the snapshot a driver writes after every decoded chunk: its bytes and the time to write it
  (local storage), for the bench preset's own latents and, built by the same code from
  zero latents of the right shapes, for Wan2.1-1.3B at 1920x1088;
- a restore in this process, against one chunk: re-prefill at each resolution (the anchor and
  the last `snapshot_window_chunks` chunks replayed) and a decoder re-primed from its last
  `snapshot_decode_frames` latent frames;
- on a local Ray: a stage replica killed mid-session; the time from the kill to the next chunk
  the client gets, the stage's restore time from `/metrics`, and the session's delay against an
  uninterrupted one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass

import httpx
import torch
from websockets.sync.client import connect

from bench.serving import local_settings
from histream_model.components import load_components
from histream_model.config import get_mode, get_preset
from histream_model.generator import HiStreamGenerator
from histream_model.schedules import new_resolution_state, plan_chunk, run_chunk
from histream_model.schedules.restore import reprefill, snapshot_chunks
from histream_model.shape import VideoShape
from services.local import server
from services.protocol import StreamKind, to_proto
from services.sessions import SessionDriver, SessionPlan, SnapshotStore
from services.sessions.record import SessionRecord
from services.settings import ServeSettings
from services.storage import Layout, LocalStorage

PROMPT = "a red fox running through fresh snow"
MODE = "histream+"
SETTINGS = ServeSettings()  # snapshot_window_chunks, snapshot_decode_frames: the defaults
KILLED = ("RefineStage", "StructureStage", "DecodePool")


def _record(shape: VideoShape, latents: list[torch.Tensor]) -> SessionRecord:
    plan = SessionPlan("bench", StreamKind.SESSION, "default", shape, 0, PROMPT, 16)
    record = SessionRecord(
        plan, SETTINGS.snapshot_window_chunks, SETTINGS.snapshot_decode_frames,
        SessionDriver.lookahead,
    )  # fmt: skip
    record.prompt(0, 0, PROMPT, to_proto(torch.zeros(1)))  # contexts are not in snapshots
    for index, z in enumerate(latents):
        record.denoised_chunk(index, to_proto(z))
        record.decoded_chunk(index, 12)
    return record


def snapshot_cost(shape: VideoShape, latents: list[torch.Tensor], repeats: int = 5):
    """(bytes, median seconds to write it) of the snapshot after the last of `latents`."""
    snapshot = _record(shape, latents).snapshot(len(latents), "bench.0")
    store = SnapshotStore(LocalStorage(tempfile.mkdtemp(prefix="histream-bench-")), Layout())
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        asyncio.run(store.save(snapshot, "session"))
        seconds.append(time.perf_counter() - started)
    return snapshot.ByteSize(), statistics.median(seconds)


def chunk_latents(shape: VideoShape, index: int, dtype: torch.dtype) -> torch.Tensor:
    """Zero clean latents of chunk `index` as a stage sends them (1, z, frames, h, w)."""
    frames = plan_chunk(shape, index).num_frames
    z = shape.preset.vae.z_dim
    return torch.zeros(1, z, frames, shape.height // 8, shape.width // 8, dtype=dtype)


@dataclass
class InProcess:
    chunk_s: float  # denoising the chunk after the restore, median
    reprefill_s: float  # every resolution's re-prefill, median
    decode_s: float  # decoding one chunk's latents, median
    reprime_s: float  # re-priming a decoder from its tail, median
    passes: int  # commit passes a re-prefill replays
    snapshot_bytes: int
    snapshot_s: float
    chunks: int  # chunks generated (the snapshot is the one after the last)


def in_process(preset_name: str, frames: int, repeats: int, log) -> InProcess:
    components = load_components(preset_name, device="cpu")
    preset, dit, vae = components.preset, components.dit, components.vae
    context = components.text.encode([PROMPT])
    shape = VideoShape(preset, get_mode(MODE), preset.height, preset.width, frames)
    gen = HiStreamGenerator(dit, preset, MODE)
    state = gen.start(context, preset.height, preset.width, frames, seed=0)
    latents = []
    while not state.done:
        latents.append(gen.step(state).latents)
    done = len(latents) - 2  # restored before the last but one chunk
    kept = {k: latents[k] for k in snapshot_chunks(done, 1, SETTINGS.snapshot_window_chunks)}
    reprefills, steps, passes = [], [], 0
    for _ in range(repeats):  # a restore, then the chunk it was for: interleaved, same shapes
        started = time.perf_counter()
        states = {}
        for resolution in shape.mode.resolutions:
            rebuilt = new_resolution_state(dit, shape, resolution, context)
            passes = reprefill(
                dit, rebuilt, shape, lambda k: plan_chunk(shape, k), kept, lambda _: context, done
            )
            rebuilt.text = dit.text_kv(context)
            states[resolution] = rebuilt
        reprefills.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            run_chunk(dit, states, shape, plan_chunk(shape, done), 0)
        steps.append(time.perf_counter() - started)
    log(f"[durability] re-prefill {statistics.median(reprefills):.3f} s ({passes} passes)")
    decodes, reprimes = [], []
    tail_frames = SETTINGS.snapshot_decode_frames
    z = latents[1]
    tail = torch.randn(*z.shape[:2], tail_frames, *z.shape[3:])
    for _ in range(repeats):
        started = time.perf_counter()
        decode_state = vae.resume_decode_state(tail, 100)
        reprimes.append(time.perf_counter() - started)
        started = time.perf_counter()
        vae.decode_frames(z, decode_state)
        decodes.append(time.perf_counter() - started)
    size, write_s = snapshot_cost(shape, latents)
    return InProcess(
        chunk_s=statistics.median(steps),
        reprefill_s=statistics.median(reprefills),
        decode_s=statistics.median(decodes),
        reprime_s=statistics.median(reprimes),
        passes=passes,
        snapshot_bytes=size,
        snapshot_s=write_s,
        chunks=len(latents),
    )


def hd_snapshot(frames: int = 477) -> tuple[int, float, int]:
    """(bytes, write seconds, chunks kept) of a Wan2.1-1.3B session's snapshot at 1920x1088
    in bfloat16, once its record holds the most it ever keeps (a long session)."""
    preset = get_preset("wan2.1-1.3b")
    shape = VideoShape(preset, get_mode(MODE), 1088, 1920, frames)
    latents = [chunk_latents(shape, k, torch.bfloat16) for k in range(shape.num_chunks - 1)]
    record = _record(shape, latents)
    size, write_s = snapshot_cost(shape, latents, repeats=3)
    return size, write_s, len(record.latents)


# -- a killed replica on a local Ray -----------------------------------------------------------


def _restore_seconds(url: str, stage: str) -> tuple[float, float]:
    """(sum, count) of histream_restore_seconds for `stage` in /metrics."""
    found = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for part in found:
            if line.startswith(f'histream_restore_seconds_{part}{{stage="{stage}"}}'):
                found[part] = float(line.split()[-1])
    return found["sum"], found["count"]


def session(port: int, frames: int, kill: str | None) -> tuple[list[float], float | None]:
    """Arrival times of every chunk of a WebSocket session (s from the start), and when the
    replica of `kill` was killed, on the arrival of chunk 2."""
    start = {"type": "start", "prompt": PROMPT, "mode": MODE, "num_frames": frames}
    arrivals, killed_at = [], None
    t0 = time.perf_counter()
    with connect(f"ws://127.0.0.1:{port}/v1/sessions", max_size=None) as ws:
        ws.send(json.dumps(start))
        while True:
            message = ws.recv(timeout=600)
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event["type"] == "chunk":
                arrivals.append(time.perf_counter() - t0)
                if kill and event["index"] == 2:
                    server.kill_replica(server.APP_NAME, kill)
                    killed_at = time.perf_counter() - t0
            elif event["type"] == "session.ended":
                break
            elif event["type"] == "error":
                raise RuntimeError(f"session failed: {event}")
    return arrivals, killed_at


def killed_replicas(preset_name: str, frames: int, log) -> tuple[list[tuple], float, float]:
    """Per stage killed: (deployment, kill to next chunk s, restore s, restores, longest gap
    between two chunks s); and the uninterrupted session's s between chunks and total s."""
    settings = local_settings(preset_name)
    server.start(settings, num_cpus=4, log_to_driver=False)
    url = f"http://127.0.0.1:{settings.http_port}"
    rows = []
    try:
        session(settings.http_port, 9, None)  # warm-up
        baseline, _ = session(settings.http_port, frames, None)
        gap = statistics.median(b - a for a, b in itertools.pairwise(baseline))
        log(f"[durability] uninterrupted: {baseline[-1]:.2f} s, {gap:.3f} s per chunk")
        for deployment in KILLED:
            before = _restore_seconds(url, deployment)
            arrivals, killed_at = session(settings.http_port, frames, deployment)
            after = _restore_seconds(url, deployment)
            restores = after[1] - before[1]
            restore_s = (after[0] - before[0]) / restores if restores else float("nan")
            following = [t for t in arrivals if t > killed_at]
            longest = max(b - a for a, b in itertools.pairwise(arrivals))
            rows.append((deployment, following[0] - killed_at, restore_s, int(restores), longest))
            log(f"[durability] {deployment} killed: {rows[-1]}")
    finally:
        server.stop()
    return rows, gap, baseline[-1]


def preset_hw(name: str) -> str:
    preset = get_preset(name)
    return f"{preset.width}x{preset.height}"


def section(preset_name: str, frames: int, repeats: int, log) -> str:
    measured = in_process(preset_name, frames, repeats, log)
    hd_bytes, hd_write_s, hd_kept = hd_snapshot()
    rows, gap, total = killed_replicas(preset_name, frames, log)
    mib = 1 << 20
    m = measured
    lines = [
        f"**Snapshots** (`{MODE}`, written after every decoded chunk to local storage; medians "
        f"of {repeats}+ writes):",
        "",
        "| session | snapshot | write |",
        "|---|---|---|",
        f"| {preset_name} preset, {preset_hw(preset_name)}, {frames} frames, after its "
        f"{m.chunks} chunks "
        f"| {m.snapshot_bytes / mib:.2f} MiB | {m.snapshot_s * 1000:.1f} ms |",
        f"| Wan2.1-1.3B, 1920x1088, bfloat16, a long session ({hd_kept} chunks kept) "
        f"| {hd_bytes / mib:.1f} MiB | {hd_write_s * 1000:.0f} ms |",
        "",
        f"**A restore in this process** ({preset_name} preset, {frames} frames, restored before "
        f"its last but one chunk; medians of {repeats}):",
        "",
        "| work | restore s | one chunk s | ratio |",
        "|---|---|---|---|",
        f"| re-prefill, both resolutions ({m.passes} commit passes each: anchor + "
        f"{SETTINGS.snapshot_window_chunks} chunks) vs denoising the next chunk "
        f"| {m.reprefill_s:.3f} | {m.chunk_s:.3f} | {m.reprefill_s / m.chunk_s:.2f}x |",
        f"| decoder re-primed from {SETTINGS.snapshot_decode_frames} latent frames vs decoding "
        f"a chunk | {m.reprime_s:.3f} | {m.decode_s:.3f} | {m.reprime_s / m.decode_s:.2f}x |",
        "",
        f"**A replica killed mid-session** (local Ray, one replica per deployment, {preset_name} "
        f"preset, {frames} frames; killed when chunk 2 reached the client; uninterrupted: "
        f"{total:.2f} s, {gap:.3f} s between chunks). Serve starts a new replica; the first "
        "call that reaches it finds the session missing and the driver restores it there. "
        "Every replica shares the same 2 cores, so a replica starting and a restore slow "
        "the others down too:",
        "",
        "| replica killed | kill to next chunk s | restore s (`/metrics`) | restores "
        "| longest gap between chunks s |",
        "|---|---|---|---|---|",
    ]
    for deployment, next_s, restore_s, restores, longest in rows:
        lines.append(
            f"| {deployment} | {next_s:.2f} | {restore_s:.3f} | {restores} | {longest:.2f} |"
        )
    return "\n".join(lines)
