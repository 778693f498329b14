"""The service under load: N streaming sessions at once against a local service.

For each configuration (decoder `wan` | `taehv`, phase batching off | on) a local service is
started (one replica per deployment, on this machine's cores) and N = 1, 2, 4, 8, 16 WebSocket
sessions are started together; each reads every chunk (its JSON event and its fMP4 segment).
Reported per N: aggregate generated frames per second (all sessions' frames over the wall time
from the first start to the last end), per-session chunk latency (time between a session's
consecutive chunks) p50/p95, and time to first chunk p50/p95.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from bench.report import table
from bench.serving import local_settings, session_events
from services.local import server

COUNTS = (1, 2, 4, 8, 16)
BATCH_SIZE = 16  # phase_batch_size when batching is on: every session of the largest N


@dataclass
class Run:
    """One N: every session's chunk arrival times (seconds after its start message)."""

    frames: int = 0
    first: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)


def session(port: int, mode: str, frames: int, run: Run, lock: threading.Lock) -> None:
    arrivals: list[float] = []
    got = 0
    for event, elapsed in session_events(port, mode, frames):
        if event["type"] == "chunk":
            arrivals.append(elapsed)
            got += event["num_frames"]
        if event["type"] == "error":
            with lock:
                run.errors.append(event.get("code", "error"))
    with lock:
        run.frames += got
        if arrivals:
            run.first.append(arrivals[0])
            run.gaps += [b - a for a, b in itertools.pairwise(arrivals)]


def sessions_at_once(port: int, count: int, mode: str, frames: int) -> Run:
    run, lock = Run(), threading.Lock()
    threads = [
        threading.Thread(target=session, args=(port, mode, frames, run, lock)) for _ in range(count)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.wall = time.perf_counter() - started
    return run


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    preset: str, decoder: str, batch: int, mode: str, frames: int, counts=COUNTS, log=print
) -> dict[int, Run]:
    settings = local_settings(preset).model_copy(
        update={
            "decoder": decoder,
            "phase_batch_size": batch,
            "max_sessions_per_replica": max(counts),
        }
    )
    server.start(settings, num_cpus=4, log_to_driver=False)
    try:
        sessions_at_once(settings.http_port, 1, mode, 9)  # warm-up
        runs = {}
        for n in counts:
            runs[n] = sessions_at_once(settings.http_port, n, mode, frames)
            rate = runs[n].frames / runs[n].wall
            log(f"  load {decoder} batch={batch} N={n}: {rate:.1f} frames/s")
    finally:
        server.stop()
    return runs


def section(preset: str, frames: int, mode: str = "histream+", log=print) -> str:
    rows = []
    aggregate: dict[tuple[str, int], dict[int, float]] = {}
    for decoder in ("wan", "taehv"):
        for batch in (1, BATCH_SIZE):
            runs = measure(preset, decoder, batch, mode, frames, log=log)
            aggregate[decoder, batch] = {n: r.frames / r.wall for n, r in runs.items()}
            for n, r in runs.items():
                rows.append([
                    f"`{decoder}`", "on" if batch > 1 else "off", n,
                    f"{r.frames / r.wall:.1f}",
                    f"{percentile(r.gaps, 0.5):.3f}", f"{percentile(r.gaps, 0.95):.3f}",
                    f"{percentile(r.first, 0.5):.3f}", f"{percentile(r.first, 0.95):.3f}",
                    ", ".join(sorted(set(r.errors))) or "",
                ])  # fmt: skip
    gains = []
    for decoder in ("wan", "taehv"):
        on, off = aggregate[decoder, BATCH_SIZE], aggregate[decoder, 1]
        gains.append(f"`{decoder}`: " + ", ".join(f"N={n} {on[n] / off[n]:.2f}x" for n in COUNTS))
    headers = ["decoder", "batching", "sessions", "frames/s (all)", "chunk p50 s",
               "chunk p95 s", "first chunk p50 s", "first chunk p95 s", "errors"]  # fmt: skip
    return (
        f"**{preset}** preset, `{mode}`, {frames} frames per session, N sessions started "
        f"together over WebSocket; batching on = `phase_batch_size` {BATCH_SIZE}. One local "
        "service per configuration, one replica per deployment on the same 2 cores.\n\n"
        + table(headers, rows)
        + "\n\nAggregate frames/s, batching on over off: "
        + "; ".join(gains)
        + "."
    )
