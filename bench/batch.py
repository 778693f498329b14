"""Batch throughput: videos per minute of one batch through the HTTP API (POST /v1/files, POST
/v1/batches, poll until completed), with every stage at 1 replica and then at 2, on a local
Ray. The batch's videos run `batch_concurrency` at once; the time is from the batch's creation
to its completion (its output file written)."""

from __future__ import annotations

import json
import tempfile
import time

import httpx

from bench.report import table
from services.local import server
from services.settings import ServeSettings, StageScaling
from services.storage import StorageSettings

SIZE = {"tiny": "192x128", "bench": "192x128"}


def run_batch(url: str, videos: int, size: str, seconds: str) -> float:
    """Seconds from creating a batch of `videos` requests to its completion."""
    lines = [
        json.dumps({"custom_id": f"v{i}", "method": "POST", "url": "/v1/videos",
                    "body": {"prompt": f"a red fox, take {i}", "seconds": seconds,
                             "size": size, "seed": i}})
        for i in range(videos)
    ]  # fmt: skip
    with httpx.Client(base_url=url, timeout=120) as http:
        files = {"file": ("in.jsonl", "\n".join(lines).encode(), "application/jsonl")}
        uploaded = http.post("/v1/files", data={"purpose": "batch"}, files=files).json()
        started = time.perf_counter()
        batch = http.post("/v1/batches", json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/videos", "completion_window": "24h",
        }).json()  # fmt: skip
        while batch["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.25)
            batch = http.get(f"/v1/batches/{batch['id']}").json()
        took = time.perf_counter() - started
    counts = batch["request_counts"]
    if counts["completed"] != videos:
        raise RuntimeError(f"batch {batch['id']} ended {batch['status']}: {counts}")
    return took


def measure(preset: str, replicas: int, videos: int, seconds: str, concurrency: int) -> float:
    stage = StageScaling(min_replicas=replicas, max_replicas=replicas, num_cpus=0)
    settings = ServeSettings(
        preset=preset,
        http_port=server.free_port(),
        grpc_port=server.free_port(),
        batch_concurrency=concurrency,
        max_running_jobs=concurrency,
        storage=StorageSettings(local_dir=tempfile.mkdtemp(prefix="histream-bench-")),
        gateway=StageScaling(num_cpus=0),
        **{name: stage for name in ("structure", "refine", "decode")},
    )
    server.start(settings, num_cpus=4, log_to_driver=False)
    try:
        url = f"http://127.0.0.1:{settings.http_port}"
        run_batch(url, 1, SIZE[preset], seconds)  # warm-up: first calls load and compile
        return run_batch(url, videos, SIZE[preset], seconds)
    finally:
        server.stop()


def section(
    presets=("tiny", "bench"), videos: int = 8, seconds: str = "2", concurrency: int = 4, log=print
) -> str:
    rows = []
    for preset in presets:
        n = videos if preset == "tiny" else max(2, videos // 4)
        took = {}
        for replicas in (1, 2):
            log(f"[batch] {preset}: {n} videos, stages at {replicas} replica(s) ...")
            took[replicas] = measure(preset, replicas, n, seconds, concurrency)
        for replicas in (1, 2):
            rows.append([
                preset, n, replicas, f"{took[replicas]:.1f}", f"{n / took[replicas] * 60:.1f}",
                f"{took[1] / took[replicas]:.2f}x",
            ])  # fmt: skip
    body = table(
        ["preset", "videos", "replicas per stage", "batch seconds", "videos / minute",
         "speed-up"], rows,
    )  # fmt: skip
    return (
        f"{body}\n\nEach video: {seconds} s at {SIZE['tiny']} (`histream+`), "
        f"`batch_concurrency` {concurrency}; one local Ray on this machine's cores, stages "
        "sharing them. A warm-up video runs first on each deployment."
    )
