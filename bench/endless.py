"""Endless sessions: one session started without num_frames, streamed for `minutes` on a local
Ray (tiny preset by default), then closed. Measured at the start (after a minute's warm-up) and
at the end: the cache bytes the gateway reports for it (`histream_cache_bytes`), the session
bytes each denoising stage holds (`histream_stage_bytes`), the median time between chunks, the
resident memory of every Serve replica process (Linux /proc), the playlist's length and the
segments left in storage (a live window of hls_window_segments; older ones deleted)."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

from bench.serving import local_settings
from services.local import server

PROMPT = "a red fox running through fresh snow"
WARMUP_S = 60.0  # the start's figures are taken this long into the session
SAMPLE_CHUNKS = 100  # chunks whose median time is compared at the start and at the end


def replica_rss() -> dict[str, int]:
    """Resident bytes of each Serve replica process, by its title (ray::ServeReplica:...)."""
    out: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if "ServeReplica" not in title:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[title.split("ServeReplica:", 1)[1]] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return out


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("histream_cache_bytes", "histream_stage_bytes")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def snapshot(url: str, arrivals: list[float]) -> dict:
    recent = arrivals[-SAMPLE_CHUNKS - 1 :]
    gaps = [b - a for a, b in itertools.pairwise(recent)]
    return {
        "chunks": len(arrivals),
        "chunk_s": statistics.median(gaps) if gaps else float("nan"),
        "metrics": metrics(url),
        "rss": replica_rss(),
    }


def run(preset: str, minutes: float, log=print) -> dict:
    # a day's cap: the tiny preset makes an hour of video in under 30 minutes here
    update = {"torch_threads": 1, "max_session_seconds": 86400}
    settings = local_settings(preset).model_copy(update=update)
    server.start(settings, num_cpus=4, log_to_driver=False)
    url = f"http://127.0.0.1:{settings.http_port}"
    storage = Path(settings.storage.local_dir)
    try:
        arrivals: list[float] = []
        start = end = None
        with connect(f"ws://127.0.0.1:{settings.http_port}/v1/sessions", max_size=None) as ws:
            ws.send(json.dumps({"type": "start", "prompt": PROMPT}))
            began = time.monotonic()
            started = None
            while True:
                message = json.loads(ws.recv(timeout=120))
                if message["type"] == "session.started":
                    started = message
                elif message["type"] in ("init", "chunk"):
                    ws.recv(timeout=120)  # the segment's bytes
                    if message["type"] == "chunk":
                        arrivals.append(time.monotonic())
                elif message["type"] in ("session.ended", "error"):
                    raise RuntimeError(f"the session ended early: {message}")
                elapsed = time.monotonic() - began
                if start is None and elapsed > WARMUP_S and len(arrivals) > SAMPLE_CHUNKS:
                    start = snapshot(url, arrivals)
                    log(f"[endless] start: {start['chunks']} chunks, {start['chunk_s']:.3f} s")
                if elapsed > minutes * 60 and start is not None:
                    end = snapshot(url, arrivals)
                    break
            sid = started["session_id"]
            prefix = storage / "tenants" / "default" / "sessions" / sid
            playlist = (prefix / "playlist.m3u8").read_text()
            segments = len(list(prefix.glob("seg-*.m4s")))
            ws.send(json.dumps({"type": "close"}))
            while json.loads(ws.recv(timeout=120))["type"] != "session.ended":
                pass
        return {
            "preset": preset, "minutes": minutes, "cap_chunks": started["num_chunks"],
            "start": start, "end": end, "playlist_segments": playlist.count("#EXTINF"),
            "stored_segments": segments, "window": settings.hls_window_segments,
        }  # fmt: skip
    finally:
        server.stop()


def _ratio(a: float, b: float) -> str:
    return f"{(b / a - 1) * 100:+.2f}%" if a else "n/a"


def section(preset: str, minutes: float, log=print) -> str:
    r = run(preset, minutes, log)
    start, end = r["start"], r["end"]
    rows = [
        ("chunks streamed", start["chunks"], end["chunks"], ""),
        ("median s between chunks (last 100)", f"{start['chunk_s']:.3f}", f"{end['chunk_s']:.3f}",
         _ratio(start["chunk_s"], end["chunk_s"])),
    ]  # fmt: skip
    for name in sorted(set(start["metrics"]) | set(end["metrics"])):
        a, b = start["metrics"].get(name, 0.0), end["metrics"].get(name, 0.0)
        rows.append((f"`{name}`", f"{a:,.0f}", f"{b:,.0f}", _ratio(a, b)))
    for name in sorted(set(start["rss"]) & set(end["rss"])):
        a, b = start["rss"][name], end["rss"][name]
        rows.append((f"RSS {name} (MiB)", f"{a / 2**20:.1f}", f"{b / 2**20:.1f}", _ratio(a, b)))
    lines = [
        f"One endless session (no `num_frames`; its cap: {r['cap_chunks']} chunks) of the "
        f"`{preset}` preset for {minutes:g} minutes on a local Ray, then closed; start = "
        f"{WARMUP_S:.0f} s in. The playlist listed {r['playlist_segments']} segments at the end "
        f"(hls_window_segments {r['window']}) and storage held {r['stored_segments']}.",
        "",
        "| | start | end | change |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    return "\n".join(lines)
