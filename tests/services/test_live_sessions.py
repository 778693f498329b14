"""Endless streaming sessions on the running service: started without num_frames they run
until closed (or their cap: max_session_seconds, or the tenant's quota), over WebSocket and
gRPC."""

from __future__ import annotations

import json

from websockets.sync.client import connect

from protos.histream.v1 import api_pb2
from services.protocol import digest, to_proto
from services.storage import Layout
from tests.services.service_calls import OTHER, PROMPT, H, W, grpc_stub, in_process, ws_events

HOUR_CAP = 1 + 4 * (3 * 4800 - 1)  # max_session_seconds (3600) at 16 fps, whole chunks


def test_a_session_without_num_frames_runs_until_closed(service):
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "seed": 1}
    chunks = []
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        events = ws_events(ws)
        started, _ = next(events)
        assert started["type"] == "session.started" and started["endless"] is True
        assert started["num_frames"] == HOUR_CAP and started["num_chunks"] == 4800
        for message, _ in events:
            if message["type"] == "chunk":
                chunks.append(message)
                if len(chunks) == 4:
                    ws.send(json.dumps({"type": "close"}))
            elif message["type"] == "session.ended":
                ended = message
    assert ended["reason"] == "closed"
    assert [c["index"] for c in chunks[:4]] == [0, 1, 2, 3] and len(chunks) < 10
    playlist = service.s3.get(f"tenants/default/sessions/{started['session_id']}/playlist.m3u8")
    text = playlist.decode()
    assert "#EXT-X-ENDLIST" in text and "#EXT-X-PLAYLIST-TYPE" not in text  # a live window


def test_an_endless_grpc_session_ends_at_the_tenants_max_session_seconds(service, tenants_service):
    """alpha's quota: 2 s of session. Its endless session (num_frames unset) completes there."""
    stub, _ = grpc_stub(service)
    md = (("application", "tenants"), ("authorization", f"Bearer {tenants_service.keys['alpha']}"))
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size="128x64")
    events = list(stub.StreamSession(request, metadata=md, timeout=120))
    started = events[0].started
    assert started.endless and started.num_frames == 33  # 2 s at 16 fps, whole chunks
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    assert [c.index for c in chunks] == [0, 1, 2] and sum(c.num_frames for c in chunks) == 33
    assert events[-1].ended.reason == "completed"
    prefix = Layout("alpha").session_prefix(started.session_id)
    assert tenants_service.storage.exists(prefix + "seg-00003.m4s")


def test_a_full_history_mode_cannot_run_endless(service):
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "mode": "no-agsw"}))
        error = json.loads(ws.recv(timeout=30))
    assert error["type"] == "error" and error["param"] == "num_frames"
    assert "endless sessions (no num_frames) run in" in error["message"]


def test_a_prompt_change_with_recache_streams_the_generators_latents(service):
    """recache: true rebuilds the window's caches under the new prompt (a restore of both
    denoisers from the record); the chunks are the in-process generator's under
    set_prompt(recache=True)."""
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 69, "seed": 4}
    chunks, accepted = [], None
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps(start))
        for message, _ in ws_events(ws):
            if message["type"] == "chunk":
                chunks.append(message)
                if len(chunks) == 1:
                    ws.send(json.dumps({"type": "prompt", "prompt": OTHER, "recache": True}))
            elif message["type"] == "prompt.accepted":
                accepted = message
            elif message["type"] == "error":
                raise AssertionError(message)
    k = accepted["from_chunk"]
    expected = in_process("histream+", 69, seed=4, prompt_at=k, transition=(1, "linear", True))
    assert [m["latents_sha256"] for m in chunks] == [digest(to_proto(x)) for x in expected]
    plain = in_process("histream+", 69, seed=4, prompt_at=k)
    assert digest(to_proto(plain[k])) != chunks[k]["latents_sha256"]  # not a plain cut
