"""Replica loss on a local Ray: the replica holding a session's KV_high, its KV_low or its decode
stream is killed mid-stream; Serve starts another, the session's stages are rebuilt from its
record there, and the session completes with every chunk once and every frame."""

from __future__ import annotations

import json
import threading

import pytest
import ray
from ray import serve
from websockets.sync.client import connect

from services.local import server
from services.media import read_video
from tests.services.service_calls import PROMPT, held_sessions, metric, wait_until


class Stream:
    """What a WebSocket session sends, read on a thread: the init segment, each chunk's event
    with its media, and the event that ended it."""

    def __init__(self) -> None:
        self.received: list[tuple[dict, bytes]] = []
        self.init: list[bytes] = [b""]
        self.ended: list[dict] = []

    def read(self, ws) -> None:
        pending = None
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                if pending is None:
                    self.init[0] = self.init[0] or message
                else:
                    self.received.append((pending, message))
                    pending = None
                continue
            event = json.loads(message)
            if event["type"] == "chunk":
                pending = event
            elif event["type"] in ("session.ended", "error"):
                self.ended.append(event)
                return

    def close_after(self, ws, chunks: int) -> None:
        """Once `chunks` more chunks arrived, close the session (an endless one)."""
        target = len(self.received) + chunks
        assert wait_until(lambda: len(self.received) >= target, timeout=120)
        ws.send(json.dumps({"type": "close"}))

    def check_video(self, path, size: tuple[int, int]) -> int:
        """Every chunk once, in order, and the segments decode to every frame; the count."""
        count = len(self.received)
        assert [e["index"] for e, _ in self.received] == list(range(count))
        path.write_bytes(self.init[0] + b"".join(data for _, data in self.received))
        assert read_video(path) == (9 + 12 * (count - 1), *size)  # tiny: 9, then 12 a chunk
        return count


def kill_replica(app: str, deployment: str) -> str:
    return server.kill_replica(app, deployment)


@pytest.mark.parametrize(
    ("deployment", "transport"),
    [("RefineStage", "handle"), ("StructureStage", "handle"), ("DecodePool", "handle"),
     ("RefineStage", "grpc"), ("DecodePool", "grpc")],
)  # fmt: skip
def test_a_session_survives_the_loss_of_a_stage_replica(service, tmp_path, deployment, transport):
    """Over either stage transport (app "local" runs the grpc one: there the gone replica's
    gRPC server stops answering, and the restore asks Serve where the session lives now)."""
    app, url = ("histream", service.url) if transport == "handle" else ("local", service.local_url)
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 117, "seed": 5}
    chunks, init, killed = [], b"", None
    with connect(url.replace("http://", "ws://") + "/v1/sessions") as ws:
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
                    killed = kill_replica(app, deployment)
            elif event["type"] in ("session.ended", "error"):
                ended = event
                break
    assert ended == {"type": "session.ended", "reason": "completed"}, ended
    assert [e["index"] for e, _ in chunks] == list(range(10))  # no gap, no duplicate
    assert [e["first_frame"] for e, _ in chunks] == [0] + [9 + 12 * i for i in range(9)]
    video = tmp_path / "survived.mp4"
    video.write_bytes(init + b"".join(data for _, data in chunks))
    assert read_video(video) == (117, 128, 64)
    assert wait_until(lambda: held_sessions(app) == 0, timeout=60)
    assert metric(url, "histream_cache_bytes") == 0
    restored = metric(url, "histream_restore_seconds_count", f'{{stage="{deployment}"}}')
    assert restored >= 1  # counted and timed in /metrics


def scale(deployment: str, replicas: int) -> None:
    """Set a stage's replica count in place, as an operator or an outside autoscaler does
    (Serve's external scaling API; the app runs with external_scaler=True)."""
    from ray.serve._private.common import DeploymentID

    controller = serve.context._get_global_client()._controller
    target = DeploymentID(name=deployment, app_name="histream")
    ray.get(controller.update_deployment_replicas.remote(target, replicas))


def running(deployment: str) -> int:
    status = serve.status().applications["histream"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0) if status.status == "HEALTHY" else -1


@pytest.mark.parametrize("deployment", ["RefineStage", "DecodePool"])
def test_a_session_survives_its_stage_scaling_up_then_down(service, tmp_path, deployment):
    """Mid-stream the stage goes to two replicas (the session's id may now hash to the new one)
    and back to one (the replica removed may be the one holding it): the session (endless,
    closed once both changes landed) goes on all the same, every chunk once, and nothing stays
    held."""
    start = {"type": "start", "prompt": PROMPT, "size": "384x256", "seed": 5}
    stream = Stream()
    received, ended, read = stream.received, stream.ended, stream.read

    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        reader = threading.Thread(target=read, args=(ws,), daemon=True)
        reader.start()
        assert wait_until(lambda: len(received) >= 2, timeout=120)
        scale(deployment, 2)
        assert wait_until(lambda: running(deployment) == 2, timeout=120)
        at_two = len(received)
        scale(deployment, 1)
        assert wait_until(lambda: running(deployment) == 1, timeout=120)
        at_one = len(received)
        stream.close_after(ws, 3)
        reader.join(timeout=300)
    assert ended == [{"type": "session.ended", "reason": "closed"}], ended
    count = stream.check_video(tmp_path / "scaled.mp4", (384, 256))  # no gap, no duplicate
    assert at_one < count, (at_two, at_one)  # both changes landed while it streamed
    assert wait_until(lambda: held_sessions() == 0, timeout=60)
    assert metric(service.url, "histream_cache_bytes") == 0


def test_prompt_updates_and_a_close_reach_a_session_from_either_gateway_replica(service):
    """Two gateway replicas: a gRPC session streams from one; prompt updates and the close
    sent meanwhile land on either (Serve picks; the busy one less often) and all reach the
    session, through the session mailbox for those that land on the other."""
    from protos.histream.v1 import api_pb2
    from tests.services.service_calls import grpc_stub

    stub, md = grpc_stub(service)
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size="128x64", num_frames=477, seed=3)
    call = stub.StreamSession(request, metadata=md, timeout=240)
    events = iter(call)
    started = next(events).started
    scale("Gateway", 2)
    try:
        assert wait_until(lambda: running("Gateway") == 2, timeout=120)
        mailbox = serve.get_deployment_handle("SessionMailbox", "histream")
        before = mailbox.stats.remote().result()["answered"]
        updates = [
            stub.UpdateSessionPrompt(
                api_pb2.UpdateSessionPromptRequest(
                    session_id=started.session_id,
                    session_token=started.session_token,
                    prompt=f"{PROMPT}, take {n}",
                ),
                metadata=md,
                timeout=60,
            )
            for n in range(6)
        ]
        closed = stub.CloseSession(
            api_pb2.CloseSessionRequest(
                session_id=started.session_id, session_token=started.session_token
            ),
            metadata=md,
            timeout=60,
        )
        rest = [e.WhichOneof("event") for e in events]
        forwarded = mailbox.stats.remote().result()["answered"] - before
    finally:
        scale("Gateway", 1)
    assert [u.prompt_version for u in updates] == [1, 2, 3, 4, 5, 6]
    assert closed.closed and rest[-1] == "ended"
    assert forwarded >= 1  # at least one call landed on the replica not driving the session
    assert wait_until(lambda: running("Gateway") == 1, timeout=120)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)
