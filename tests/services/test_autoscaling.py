"""Autoscaling shown on a local Ray: a batch raises a stage from 1 replica to 2 (Serve
autoscaling on ongoing requests) and it falls back to 1 once the batch is done, while a
streaming session runs across both changes. Every batch line completes, the session's chunks
are contiguous and decode to every frame, nothing stays allocated.

The stage is the decode pool: on this machine's CPU the VAE is what a batch queues on (the
refine stage's calls are short and rarely pile up); on GPUs the denoisers are, and the same
settings scale them. Moving a session between replicas is the same restore either way."""

from __future__ import annotations

import json
import threading
import time

import httpx
from ray import serve
from websockets.sync.client import connect

from tests.services.service_calls import PROMPT, stage, wait_until
from tests.services.test_survival import Stream

APP = "scaling"
STAGE = "DecodePool"


def demand_now() -> float:
    """The stage's ongoing requests as Serve's autoscaler sees them."""
    import ray
    from ray.serve._private.common import DeploymentID

    controller = serve.context._get_global_client()._controller
    target = DeploymentID(name=STAGE, app_name=APP)
    return ray.get(controller._get_total_num_requests_for_deployment_for_testing.remote(target))


def running() -> int:
    status = serve.status().applications[APP].deployments[STAGE]
    return status.replica_states.get("RUNNING", 0)


def held(app: str = APP) -> int:
    return sum(
        stage(name, app).stats.remote().result()["sessions"]
        for name in ("StructureStage", "RefineStage", "DecodePool")
    )


def test_a_batch_scales_a_stage_up_and_down_under_a_live_session(scaling_service, tmp_path):
    # an endless session, closed once both changes landed: it streams across both
    start = {"type": "start", "prompt": PROMPT, "size": "384x256", "seed": 8}
    stream = Stream()
    received, ended, read = stream.received, stream.ended, stream.read

    replicas: list[int] = []
    watching = threading.Event()

    demand: list[float] = []

    def watch() -> None:
        while not watching.is_set():
            replicas.append(running())
            demand.append(demand_now())
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = [
        json.dumps({"custom_id": f"v{i}", "method": "POST", "url": "/v1/videos",
                    "body": {"prompt": PROMPT, "seconds": "1", "size": "384x256", "seed": i}})
        for i in range(4)
    ]  # fmt: skip
    api = httpx.Client(base_url=scaling_service.url, timeout=60)
    try:
        with connect(scaling_service.ws_url) as ws:
            ws.send(json.dumps(start))
            reader = threading.Thread(target=read, args=(ws,), daemon=True)
            reader.start()
            assert wait_until(lambda: len(received) >= 1, timeout=120)
            files = {"file": ("in.jsonl", "\n".join(lines).encode(), "application/jsonl")}
            uploaded = api.post("/v1/files", data={"purpose": "batch"}, files=files).json()
            batch = api.post("/v1/batches", json={
                "input_file_id": uploaded["id"], "endpoint": "/v1/videos",
                "completion_window": "24h",
            }).json()  # fmt: skip
            assert wait_until(lambda: running() == 2, timeout=120), (max(demand), demand[::8])
            up_at = len(received)
            assert wait_until(
                lambda: api.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed",
                timeout=240,
            )
            assert wait_until(lambda: running() == 1, timeout=120), demand[-40::4]
            down_at = len(received)
            stream.close_after(ws, 3)
            reader.join(timeout=300)
        batch = api.get(f"/v1/batches/{batch['id']}").json()
    finally:
        watching.set()
        api.close()
    assert ended == [{"type": "session.ended", "reason": "closed"}], ended
    trace = list(zip(replicas, [round(d, 2) for d in demand], strict=False))[::4]
    count = stream.check_video(tmp_path / "scaled.mp4", (384, 256))  # no gap, no duplicate
    assert 0 < up_at <= down_at < count, (up_at, down_at, trace)  # both while it streamed
    assert batch["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert max(replicas) == 2 and replicas[-1] == 1
    assert wait_until(lambda: held() == 0, timeout=60)
