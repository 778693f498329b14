"""Client resume on a local Ray: a client whose connection drops, or whose gateway replica dies,
reconnects with the session id, its token and the last chunk it has, and gets every later chunk
exactly once; the video it assembles decodes to every frame."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from websockets.sync.client import connect

from protos.histream.v1 import api_pb2
from services.media import read_video
from services.protocol import digest, to_proto
from tests.services.service_calls import (
    PROMPT,
    H,
    W,
    client,
    grpc_stub,
    held_sessions,
    in_process,
    wait_until,
    wait_video,
)
from tests.services.test_survival import kill_replica

START = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 117, "seed": 9}


class Client:
    """What a player keeps: the init segment, and each chunk's event and media by index."""

    def __init__(self) -> None:
        self.init = b""
        self.chunks: dict[int, tuple[dict, bytes]] = {}
        self.started: dict = {}
        self.ended: dict | None = None

    def receive(self, ws, stop_after: int | None = None) -> None:
        """Events until the session ends, or (`stop_after`) until that chunk arrived."""
        pending = None
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                if pending is None:
                    self.init = self.init or message
                else:
                    assert pending["index"] not in self.chunks, "a chunk arrived twice"
                    self.chunks[pending["index"]] = (pending, message)
                    if pending["index"] == stop_after:
                        return
                    pending = None
                continue
            event = json.loads(message)
            if event["type"] == "session.started":
                self.started = event
            elif event["type"] == "chunk":
                pending = event
            elif event["type"] in ("session.ended", "error"):
                self.ended = event
                return

    @property
    def last(self) -> int:
        return max(self.chunks, default=-1)

    def video(self, path) -> tuple:
        path.write_bytes(self.init + b"".join(self.chunks[i][1] for i in sorted(self.chunks)))
        return read_video(path)


def ws_url(service) -> str:
    return f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions"


def resume(client: Client, service) -> None:
    started = client.started
    message = {"type": "resume", "session_id": started["session_id"],
               "session_token": started["session_token"], "last_chunk": client.last}  # fmt: skip
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(message))
        client.receive(ws)


def restores(service) -> int:
    """Stage rebuilds the gateway has counted (histream_restore_seconds, every stage)."""
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    prefix = "histream_restore_seconds_count{"
    return sum(
        int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(prefix)
    )


def test_a_client_whose_connection_drops_resumes_and_gets_every_chunk_once(service, tmp_path):
    """Resumed within session_resume_grace_s: the stages kept the session's state, and the
    resume takes it up as it is (nothing rebuilt)."""
    client = Client()
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(START))
        client.receive(ws, stop_after=3)
    first_id = client.started["session_id"]  # the socket closed: the session is suspended
    before = restores(service)
    resume(client, service)
    assert restores(service) == before  # taken up as kept: no stage rebuilt its share
    assert client.started["resumed"] and client.started["session_id"] == first_id
    assert client.ended == {"type": "session.ended", "reason": "completed"}
    assert sorted(client.chunks) == list(range(10))  # every chunk once (asserted on arrival)
    frames = [client.chunks[i][0]["first_frame"] for i in range(10)]
    assert frames == [0] + [9 + 12 * i for i in range(9)]
    assert client.video(tmp_path / "resumed.mp4") == (117, 128, 64)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)


def test_a_resume_after_the_grace_rebuilds_every_stage_from_the_snapshot(service, tmp_path):
    """Past session_resume_grace_s the stages have freed the session (no cache bytes held);
    the snapshot still rebuilds it, and the client still gets every chunk once."""
    client = Client()
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(START))
        client.receive(ws, stop_after=1)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)  # grace 4 s, then freed
    before = restores(service)
    resume(client, service)
    assert restores(service) == before + 3  # structure, refine, decode: each rebuilt
    assert client.ended == {"type": "session.ended", "reason": "completed"}
    assert sorted(client.chunks) == list(range(10))
    assert client.video(tmp_path / "rebuilt.mp4") == (117, 128, 64)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)


@pytest.mark.parametrize("mode", ["histream-hiar", "diagonal"])
def test_other_seeds_resume_from_a_snapshot_with_their_write_inputs(service, tmp_path, mode):
    """HiAR's step caches and Diagonal's kept last passes are rebuilt from the write inputs the
    snapshot in storage keeps: the chunks after the resume are the in-process generator's, bit
    for bit (every chunk made before the suspend is within the replayed window)."""
    client = Client()
    start = START | {"mode": mode, "size": f"{W}x{H}"}
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(start))
        client.receive(ws, stop_after=1)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)  # freed: a rebuild follows
    before = restores(service)
    resume(client, service)
    assert restores(service) > before
    assert client.ended == {"type": "session.ended", "reason": "completed"}
    sha = [client.chunks[i][0]["latents_sha256"] for i in range(10)]
    assert sha == [digest(to_proto(x)) for x in in_process(mode, 117, seed=9)]
    assert wait_until(lambda: held_sessions() == 0, timeout=60)


def test_a_resume_with_a_wrong_token_or_after_the_end_is_not_found(service):
    client = Client()
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps({**START, "num_frames": 21}))
        client.receive(ws)
    assert client.ended["reason"] == "completed"
    for token in ("somebody-elses-guess", client.started["session_token"]):
        with connect(ws_url(service)) as ws:
            ws.send(json.dumps({"type": "resume", "session_id": client.started["session_id"],
                                "session_token": token, "last_chunk": 0}))  # fmt: skip
            error = json.loads(ws.recv(timeout=30))
        assert (error["type"], error["code"]) == ("error", "not_found")


def test_a_grpc_client_resumes_after_cancelling(service, tmp_path):
    stub, md = grpc_stub(service)
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size="128x64", num_frames=117, seed=9)
    call = stub.StreamSession(request, metadata=md, timeout=120)
    started, init, chunks = None, b"", {}
    for event in call:
        kind = event.WhichOneof("event")
        started = started or (event.started if kind == "started" else None)
        init = init or (event.init.data if kind == "init" else b"")
        if kind == "chunk":
            chunks[event.chunk.index] = event.chunk.data
            if event.chunk.index == 2:
                break
    call.cancel()
    again = api_pb2.ResumeSessionRequest(
        session_id=started.session_id, session_token=started.session_token, last_chunk=2
    )
    kinds = []
    for event in stub.ResumeSession(again, metadata=md, timeout=120):
        kind = event.WhichOneof("event")
        kinds.append(kind)
        if kind == "chunk":
            assert event.chunk.index not in chunks
            chunks[event.chunk.index] = event.chunk.data
        if kind == "started":
            assert event.started.resumed
    assert kinds[-1] == "ended" and sorted(chunks) == list(range(10))
    video = tmp_path / "grpc-resumed.mp4"
    video.write_bytes(init + b"".join(chunks[i] for i in range(10)))
    assert read_video(video) == (117, 128, 64)
    with pytest.raises(grpc.RpcError) as err:  # it has ended: nothing left to resume
        list(stub.ResumeSession(again, metadata=md, timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_session_survives_the_loss_of_its_gateway_replica(service, tmp_path):
    client = Client()
    try:
        with connect(ws_url(service)) as ws:
            ws.send(json.dumps(START))
            client.receive(ws, stop_after=2)
            kill_replica("histream", "Gateway")
            client.receive(ws)  # the connection breaks
    except Exception:
        pass
    assert client.last >= 2
    # Serve starts another gateway replica; the session is taken up from its snapshot there
    assert wait_until(lambda: _healthy(service), timeout=120)
    resume(client, service)
    assert client.ended == {"type": "session.ended", "reason": "completed"}, client.ended
    assert sorted(client.chunks) == list(range(10))
    assert client.video(tmp_path / "gateway-lost.mp4") == (117, 128, 64)


def _healthy(service) -> bool:
    import httpx

    try:
        return httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_video_job_survives_the_loss_of_its_gateway_replica(service, tmp_path):
    """The job's lease runs out with its replica; the replica Serve starts instead takes the job
    up from its last snapshot and completes it (job_lease_s=3 here)."""
    body = {"prompt": PROMPT, "size": "128x64", "seconds": "7", "seed": 4}
    video = httpx.post(f"{service.url}/v1/videos", json=body, timeout=30).json()
    url = f"{service.url}/v1/videos/{video['id']}"

    def progress() -> int:
        return httpx.get(url, timeout=5).json()["progress"]

    assert wait_until(lambda: progress() >= 20, timeout=120)
    kill_replica("histream", "Gateway")
    assert wait_until(lambda: _healthy(service), timeout=120)
    api = client(service.url)
    done = wait_video(api, video["id"], timeout=180)
    assert done.status == "completed", done.error
    assert done.progress == 100 and done.id == video["id"]
    mp4 = tmp_path / "job.mp4"
    api.videos.download_content(done.id).write_to_file(mp4)
    assert read_video(mp4) == (video["num_frames"], 128, 64)
    assert wait_until(lambda: held_sessions() == 0, timeout=60)
