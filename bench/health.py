"""Health under load: `/healthz` latency while streaming sessions hold the gateway.

Each row opens N WebSocket sessions (the stages admit `max_sessions_per_replica` of them; the
rest wait for capacity, which is what long-lived sessions do to a gateway), then times
`requests` health checks one after another.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import ExitStack

import httpx
from websockets.sync.client import connect

from bench.report import table
from services.local import server
from services.settings import ServeSettings, StageScaling
from services.storage import StorageSettings

START = {"type": "start", "prompt": "a red fox", "size": "128x64", "num_frames": 201}


def latencies(settings: ServeSettings, sessions: int, requests: int) -> list[float]:
    base = f"127.0.0.1:{settings.http_port}"
    with ExitStack() as stack:
        for _ in range(sessions):
            ws = stack.enter_context(connect(f"ws://{base}/v1/sessions"))
            ws.send(json.dumps(START))
        time.sleep(3)  # let every session reach the gateway (started, or waiting for capacity)
        out = []
        with httpx.Client(base_url=f"http://{base}", timeout=120) as http:
            for _ in range(requests):
                started = time.perf_counter()
                http.get("/healthz").raise_for_status()
                out.append(time.perf_counter() - started)
    return sorted(out)


def section(loads=(0, 16, 24, 48), requests: int = 200, log=print) -> str:
    stage = StageScaling(num_cpus=0)
    settings = ServeSettings(
        preset="tiny",
        http_port=server.free_port(),
        grpc_port=server.free_port(),
        max_sessions_per_replica=4,
        storage=StorageSettings(local_dir=tempfile.mkdtemp(prefix="histream-bench-")),
        **{name: stage for name in ("gateway", "structure", "refine", "decode")},
    )
    server.start(settings, num_cpus=4, log_to_driver=False)
    rows = []
    try:
        for n in loads:
            lat = latencies(settings, n, requests)
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            rows.append([n, f"{statistics.median(lat) * 1e3:.1f}", f"{p99 * 1e3:.1f}",
                         f"{lat[-1] * 1e3:.1f}"])  # fmt: skip
            log(f"[health] {n} sessions done")
            time.sleep(3)  # the closed sessions free their stages
    finally:
        server.stop()
    return (
        f"**tiny** preset, one gateway replica, the stages admitting "
        f"{settings.max_sessions_per_replica} sessions; {requests} `GET /healthz` one after "
        "another per row, with that many WebSocket sessions open (those the stages do not admit "
        "wait for capacity, holding their connection).\n\n"
        + table(["open sessions", "p50 ms", "p99 ms", "max ms"], rows)
    )
