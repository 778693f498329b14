"""What players get: a published video declares its duration in a moov before its media, the
content endpoint serves byte ranges, and a session's playlist is sealed however it ends."""

from __future__ import annotations

import io
import json

import av
import httpx
import pytest
from websockets.sync.client import connect

from services.media import iter_boxes
from tests.services.service_calls import PROMPT, client, wait_until, wait_video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai's Sora notice


def published(service) -> tuple[str, bytes]:
    api = client(service.local_url)
    video = api.videos.create(prompt=PROMPT, size="128x64", seconds="2")
    assert wait_video(api, video.id).status == "completed"
    return video.id, service.local.get(f"tenants/default/videos/{video.id}/video.mp4")


def test_a_published_video_declares_its_duration_up_front(service):
    _, mp4 = published(service)
    boxes = [box.type for box in iter_boxes(mp4)]
    assert boxes.index("moov") < boxes.index("mdat") and "moof" not in boxes  # not fragmented
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        declared = float(stream.duration * stream.time_base)  # from the header, nothing decoded
        assert stream.frames == 33
        assert abs(declared - 33 / 16) < 1e-6
        assert sum(1 for _ in container.decode(stream)) == 33


def test_content_serves_byte_ranges(service):
    video_id, mp4 = published(service)
    url = f"{service.local_url}/v1/videos/{video_id}/content"
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content == mp4
    assert whole.headers["accept-ranges"] == "bytes"
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == mp4[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(mp4)}"
    assert httpx.get(url, headers={"Range": "bytes=-50"}).content == mp4[-50:]
    assert httpx.get(url, headers={"Range": "bytes=1000-"}).content == mp4[1000:]
    past = httpx.get(url, headers={"Range": f"bytes={len(mp4)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(mp4)}"


def test_a_lost_client_leaves_a_sealed_playlist_once_its_resume_window_passed(service):
    """On the app with session_snapshot_ttl_s=3: nobody resumes, so the session ends for good:
    its playlist sealed, its snapshot removed, and a resume is answered not_found."""
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 201}
    started = {}
    url = f"ws://127.0.0.1:{service.settings.http_port}/local/v1/sessions"
    with connect(url) as ws:
        ws.send(json.dumps(start))
        while True:  # go away after the first chunk
            message = ws.recv(timeout=60)
            event = json.loads(message) if isinstance(message, str) else {"type": "media"}
            if event["type"] == "session.started":
                started = event
            elif event["type"] == "chunk":
                break
    prefix = f"tenants/default/sessions/{started['session_id']}/"

    def sealed() -> bool:
        key = prefix + "playlist.m3u8"
        return service.local.exists(key) and "#EXT-X-ENDLIST" in service.local.get(key).decode()

    assert wait_until(sealed, timeout=60)
    assert wait_until(lambda: not service.local.exists(prefix + "snapshot.pb"), timeout=10)
    with connect(url) as ws:
        token = started["session_token"]
        message = {"type": "resume", "session_id": started["session_id"], "session_token": token}
        ws.send(json.dumps(message))
        error = json.loads(ws.recv(timeout=30))
    assert (error["type"], error["code"]) == ("error", "not_found")
