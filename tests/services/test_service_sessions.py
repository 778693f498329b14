"""Streaming sessions on the distributed service (a local Ray, tiny preset): over WebSocket and
gRPC, under both stage transports, prompt changes blended or slerped into the in-process
generator's latents, the other seeds, close and disconnect freeing the stages."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from histream_model.config import get_mode, get_preset
from histream_model.schedules import plan_chunk
from histream_model.schedules.pipeline import split_phases
from histream_model.shape import VideoShape
from protos.histream.v1 import api_pb2
from services.media import decode_frames, read_video
from services.protocol import digest, to_proto
from tests.services.service_calls import (
    OTHER,
    PROMPT,
    TRANSPORT_APPS,
    H,
    W,
    grpc_stub,
    held_sessions,
    in_process,
    metric,
    step_runs,
    wait_until,
    ws_events,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("transport", ["handle", "grpc"])
def test_websocket_session_streams_chunks_and_blends_in_a_new_prompt(service, tmp_path, transport):
    """A prompt change blended linearly over 2 chunks; the latents are the in-process
    generator's under the same change, over either stage transport."""
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 117, "seed": 3,
             "mode": "histream+"}  # fmt: skip
    chunks, accepted, applied, ended = [], None, [], None
    base = service.url if transport == "handle" else service.local_url
    with connect(base.replace("http://", "ws://") + "/v1/sessions") as ws:
        ws.send(json.dumps(start))
        events = ws_events(ws)
        started, _ = next(events)
        assert started["type"] == "session.started" and started["num_chunks"] == 10
        init_msg, init = next(events)
        assert init_msg["type"] == "init" and len(init) == init_msg["bytes"]
        for message, data in events:
            if message["type"] == "chunk":
                chunks.append((message, data))
                if len(chunks) == 1:
                    change = {"type": "prompt", "prompt": OTHER, "transition_chunks": 2,
                              "interpolation": "linear"}  # fmt: skip
                    ws.send(json.dumps(change))
            elif message["type"] == "prompt.accepted":
                accepted = message
            elif message["type"] == "prompt.applied":
                applied.append((message, len(chunks)))
            elif message["type"] == "session.ended":
                ended = message
            elif message["type"] == "error":
                pytest.fail(message["message"])
    assert [m["index"] for m, _ in chunks] == list(range(10))
    assert [m["first_frame"] for m, _ in chunks] == [0] + [9 + 12 * i for i in range(9)]
    assert accepted is not None and 1 <= accepted["from_chunk"] < 10
    k = accepted["from_chunk"]
    assert [m["prompt_version"] for m, _ in chunks] == [0] * k + [1] * (10 - k)
    # the prompt is announced applied once, right before the first chunk made under it
    assert [(m["prompt_version"], m["from_chunk"], before) for m, before in applied] == [(1, k, k)]
    assert ended is not None and ended["reason"] == "completed"

    # the stream decodes to the whole video
    mp4 = tmp_path / "stream.mp4"
    mp4.write_bytes(init + b"".join(d for _, d in chunks))
    assert read_video(mp4) == (117, W, H)

    # chunks before k were generated under the first prompt, k half-way, then the new one
    expected = in_process("histream+", 117, seed=3, prompt_at=k, transition=(2, "linear"))
    assert [m["latents_sha256"] for m, _ in chunks] == [digest(to_proto(x)) for x in expected]
    unchanged = in_process("histream+", 117, seed=3)
    cut = in_process("histream+", 117, seed=3, prompt_at=k)
    for other in (unchanged, cut):  # the blend is neither the old prompt nor a cut
        assert digest(to_proto(other[k])) != chunks[k][0]["latents_sha256"]

    # the session's HLS playlist and segments are in storage, ended
    sid = started["session_id"]
    storage = service.s3 if transport == "handle" else service.local
    playlist = storage.get(f"tenants/default/sessions/{sid}/playlist.m3u8").decode()
    assert playlist.count("#EXTINF") == 10 and "#EXT-X-ENDLIST" in playlist
    assert storage.exists(f"tenants/default/sessions/{sid}/seg-00010.m4s")


@pytest.mark.parametrize(
    ("mode", "door"),
    [("diagonal", "websocket"), ("histream-hiar", "websocket"),
     ("hiar", "grpc"), ("histream-diagonal", "grpc")],
)  # fmt: skip
def test_other_seeds_stream_the_in_process_latents(service, mode, door):
    """Diagonal's and HiAR's modes through the streaming front doors: every chunk's latents are
    the in-process generator's (45 frames: 4 chunks, Diagonal's 5, 4, 3 and 2 steps). This app
    runs HiAR's modes as a wavefront on its two step workers."""
    hiar_before = step_runs()
    if door == "websocket":
        start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 45,
                 "seed": 2, "mode": mode}  # fmt: skip
        with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
            ws.send(json.dumps(start))
            messages = [m for m, _ in ws_events(ws)]
        assert messages[0]["mode"] == mode, messages[0]
        sha = [m["latents_sha256"] for m in messages if m["type"] == "chunk"]
    else:
        stub, md = grpc_stub(service)
        request = api_pb2.StreamSessionRequest(
            prompt=PROMPT, size=f"{W}x{H}", num_frames=45, seed=2, mode=mode
        )
        events = list(stub.StreamSession(request, metadata=md, timeout=120))
        assert events[-1].WhichOneof("event") == "ended", events[-1]
        sha = [e.chunk.latents_sha256 for e in events if e.WhichOneof("event") == "chunk"]
    assert sha == [digest(to_proto(x)) for x in in_process(mode, 45, seed=2)]
    if "hiar" in mode:  # on the step workers, each its share of the 4 phases of 4 chunks
        shape = VideoShape(get_preset("tiny"), get_mode(mode), H, W, 45)
        shares = [4 * len(g) for g in split_phases(plan_chunk(shape, 0), 2, shape)]
        assert shares == ([8, 8] if mode == "hiar" else [12, 4])  # steps 1-3 | 4 by work
        assert [b - a for a, b in zip(hiar_before, step_runs(), strict=True)] == shares
    assert wait_until(lambda: held_sessions() == 0)


def test_websocket_close_message_ends_the_session_as_closed(service):
    """`{"type": "close"}` stops the session after the chunks already started: it ends with
    reason `closed` before its last chunk, and the stages free its caches."""
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 117, "seed": 1}
    got, ended = [], None
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        for message, _ in ws_events(ws):
            if message["type"] == "chunk":
                got.append(message["index"])
                if len(got) == 1:
                    ws.send(json.dumps({"type": "close"}))
            elif message["type"] == "session.ended":
                ended = message
    assert ended is not None and ended["reason"] == "closed"
    assert got[0] == 0 and got == list(range(len(got))) and len(got) < 10
    assert wait_until(lambda: held_sessions() == 0)


def test_websocket_disconnect_frees_the_session(service):
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 201}
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        for message, _ in ws_events(ws, until="chunk"):
            if message["type"] == "session.started":
                assert metric(service.url, "histream_active_sessions", '{kind="session"}') == 1
                assert metric(service.url, "histream_cache_bytes") > 0
    # the client went away mid-stream: caches freed everywhere, no active session left
    assert wait_until(
        lambda: metric(service.url, "histream_active_sessions", '{kind="session"}') == 0
    )
    assert metric(service.url, "histream_cache_bytes") == 0
    assert wait_until(lambda: held_sessions() == 0)


@pytest.mark.parametrize("transport", ["handle", "grpc"])
def test_grpc_session_streams_chunks_and_slerps_to_a_new_prompt(service, tmp_path, transport):
    stub, md = grpc_stub(service, TRANSPORT_APPS[transport])
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size=f"{W}x{H}", num_frames=117, seed=11)
    events: list = []
    update = None
    for event in stub.StreamSession(request, metadata=md, timeout=120):
        events.append(event)
        if event.WhichOneof("event") == "chunk" and update is None:
            session_id = events[0].started.session_id
            update = stub.UpdateSessionPrompt(
                api_pb2.UpdateSessionPromptRequest(
                    session_id=session_id,
                    prompt=OTHER,
                    session_token=events[0].started.session_token,
                    transition_chunks=3,
                    interpolation="slerp",
                ),
                metadata=md,
            )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:2] == ["started", "init"] and kinds[-1] == "ended"
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    assert [c.index for c in chunks] == list(range(10))
    k = update.from_chunk
    applied = [e.prompt_updated for e in events if e.WhichOneof("event") == "prompt_updated"]
    assert [(p.prompt_version, p.from_chunk) for p in applied] == [(1, k)]
    expected = in_process("histream+", 117, seed=11, prompt_at=k, transition=(3, "slerp"))
    assert [c.latents_sha256 for c in chunks] == [digest(to_proto(x)) for x in expected]
    mp4 = tmp_path / "grpc.mp4"
    mp4.write_bytes(events[1].init.data + b"".join(c.data for c in chunks))
    frames = decode_frames(mp4)
    assert frames.shape == (117, H, W, 3)


def test_grpc_cancel_frees_the_session(service):
    stub, md = grpc_stub(service)
    call = stub.StreamSession(
        api_pb2.StreamSessionRequest(prompt=PROMPT, num_frames=201), metadata=md, timeout=120
    )
    for event in call:
        if event.WhichOneof("event") == "chunk":
            break
    call.cancel()
    assert wait_until(lambda: held_sessions() == 0)
    assert wait_until(
        lambda: metric(service.url, "histream_active_sessions", '{kind="session"}') == 0
    )


def test_two_prompt_updates_sent_at_once_are_both_answered(service):
    """Both updates' prompt encodings are in flight at once from one WebSocket request: each
    call must be routed on its own (they once shared Serve's internal request id, and the
    second was never answered)."""
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 477, "seed": 2}
    accepted, kinds = [], []
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        sent = False
        while True:
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            kinds.append(event["type"])
            if event["type"] == "chunk" and not sent:
                ws.send(json.dumps({"type": "prompt", "prompt": "a heron in the reeds"}))
                ws.send(json.dumps({"type": "prompt", "prompt": "an owl at dusk"}))
                sent = True
            elif event["type"] == "prompt.accepted":
                accepted.append(event["prompt_version"])
            elif event["type"] in ("session.ended", "error"):
                break
    # both answered; the second is version 2 (the first is 1, or 2 if the second superseded it
    # before a chunk boundary: superseded updates are answered with the one that applied)
    assert len(accepted) == 2 and sorted(accepted)[1] == 2, (accepted, kinds[-5:])
    assert kinds[-1] == "session.ended"
