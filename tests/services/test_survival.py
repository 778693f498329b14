"""Replica loss on a local Ray: the replica holding a session's KV_high, its KV_low or its decode
stream is killed mid-stream; Serve starts another, the session's stages are rebuilt from its
record there, and the session completes with every chunk once and every frame."""

from __future__ import annotations

import json

import pytest
import ray
from websockets.sync.client import connect

from services.media import read_video
from tests.services.test_service import PROMPT, held_sessions, metric, wait_until


def kill_replica(app: str, deployment: str) -> str:
    """Kill the (one) replica actor of `deployment` in `app`; returns its name."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in name:
            ray.kill(ray.get_actor(name, namespace=actor["namespace"]), no_restart=True)
            return name
    raise AssertionError(f"no replica of {app}/{deployment} among the named actors")


@pytest.mark.parametrize("deployment", ["RefineStage", "StructureStage", "DecodePool"])
def test_a_session_survives_the_loss_of_a_stage_replica(service, tmp_path, deployment):
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 117, "seed": 5}
    chunks, init, killed = [], b"", None
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                if chunks and chunks[-1][1] is None:
                    chunks[-1] = (chunks[-1][0], message)
                else:
                    init = init or message
                continue
            event = json.loads(message)
            if event["type"] == "chunk":
                chunks.append((event, None))
                if event["index"] == 2 and killed is None:
                    killed = kill_replica("histream", deployment)
            elif event["type"] in ("session.ended", "error"):
                ended = event
                break
    assert ended == {"type": "session.ended", "reason": "completed"}, ended
    assert [e["index"] for e, _ in chunks] == list(range(10))  # no gap, no duplicate
    assert [e["first_frame"] for e, _ in chunks] == [0] + [9 + 12 * i for i in range(9)]
    video = tmp_path / "survived.mp4"
    video.write_bytes(init + b"".join(data for _, data in chunks))
    assert read_video(video) == (117, 128, 64)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)
    assert metric(service.url, "histream_cache_bytes") == 0
    restored = metric(service.url, "histream_restore_seconds_count", f'{{stage="{deployment}"}}')
    assert restored >= 1  # counted and timed in /metrics
