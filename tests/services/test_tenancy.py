"""Tenants on a local Ray (app "tenants", two tenants with keys): every transport refuses a
missing or bad key before any work, and one tenant's videos and sessions are invisible to the
other (404 / NOT_FOUND exactly like unknown ids)."""

from __future__ import annotations

import json
import re
import warnings

import grpc
import httpx
import openai
import pytest
from websockets.sync.client import connect

from protos.histream.v1 import api_pb2, api_pb2_grpc
from services.media import read_video
from tests.services.service_calls import PROMPT, wait_video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def stub(service, key: str | None):
    metadata = [("application", "tenants")]
    if key is not None:
        metadata.append(("authorization", f"Bearer {key}"))
    channel = grpc.insecure_channel(service.grpc_target)
    return api_pb2_grpc.HiStreamStub(channel), tuple(metadata)


def ws_url(tenants) -> str:
    return tenants.url.replace("http://", "ws://") + "/v1/sessions"


def grpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.mark.parametrize("key", [None, "sk-not-a-key"])
def test_a_missing_or_bad_key_is_refused_on_every_transport(service, tenants_service, key):
    headers = bearer(key) if key else {}
    routes = [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/v1/models"),
              ("GET", "/v1/videos/video_x"), ("DELETE", "/v1/videos/video_x")]  # fmt: skip
    for method, path in routes:
        body = {"prompt": PROMPT} if method == "POST" else None
        response = httpx.request(method, tenants_service.url + path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(tenants_service.url + "/healthz").status_code == 200  # probes stay open

    with connect(ws_url(tenants_service), additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "num_frames": 9}))
        event = json.loads(ws.recv(timeout=30))
    assert (event["type"], event["code"]) == ("error", "invalid_api_key")

    api, md = stub(service, key)
    assert grpc_code(lambda: api.ListVideos(api_pb2.ListVideosRequest(), metadata=md, timeout=30)) \
        == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, num_frames=9)
    assert grpc_code(lambda: list(api.StreamSession(request, metadata=md, timeout=30))) \
        == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
    # nothing was created for anyone
    alpha = tenants_service.keys["alpha"]
    listed = httpx.get(tenants_service.url + "/v1/videos", headers=bearer(alpha)).json()
    assert all(v["prompt"] != PROMPT or v["status"] != "queued" for v in listed["data"])


def test_a_tenant_sees_only_its_own_videos(service, tenants_service, tmp_path):
    keys = tenants_service.keys
    alpha = openai.OpenAI(base_url=f"{tenants_service.url}/v1", api_key=keys["alpha"],
                          max_retries=0)  # fmt: skip
    bravo = openai.OpenAI(base_url=f"{tenants_service.url}/v1", api_key=keys["bravo"],
                          max_retries=0)  # fmt: skip
    video = alpha.videos.create(prompt=PROMPT, seconds="1", size="128x64")
    done = wait_video(alpha, video.id)
    assert done.status == "completed", done.error
    path = tmp_path / "alpha.mp4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        alpha.videos.download_content(video.id).write_to_file(path)
        assert read_video(path) == (21, 128, 64)
        # bravo: exactly as if the id did not exist
        for attempt in (
            lambda: bravo.videos.retrieve(video.id),
            lambda: bravo.videos.delete(video.id),
            lambda: bravo.videos.download_content(video.id),
        ):
            with pytest.raises(openai.NotFoundError) as err:
                attempt()
            assert err.value.body["code"] == "not_found"
        assert video.id not in [v.id for v in bravo.videos.list(limit=100).data]
        assert video.id in [v.id for v in alpha.videos.list(limit=100).data]
    api, md = stub(service, keys["bravo"])
    get = api_pb2.GetVideoRequest(id=video.id)
    not_found = grpc_code(lambda: api.GetVideo(get, metadata=md, timeout=30))
    assert not_found == grpc.StatusCode.NOT_FOUND
    api, md = stub(service, keys["alpha"])
    assert api.GetVideo(get, metadata=md, timeout=30).status == "completed"
    # its objects live under alpha's prefix, nothing under bravo's
    keys_stored = tenants_service.storage.list("tenants/")
    assert f"tenants/alpha/videos/{video.id}/video.mp4" in keys_stored
    assert not [k for k in keys_stored if k.startswith("tenants/bravo/") and video.id in k]


def test_a_tenant_cannot_update_close_or_resume_anothers_session(service, tenants_service):
    keys = tenants_service.keys
    start = {
        "type": "start",
        "prompt": PROMPT,
        "size": "128x64",
        "num_frames": 57,
        "api_key": keys["alpha"],
    }  # the browser way: the key in the first message
    with connect(ws_url(tenants_service)) as ws:
        ws.send(json.dumps(start))
        started = None
        while started is None:
            message = ws.recv(timeout=60)
            if isinstance(message, str) and '"session.started"' in message:
                started = json.loads(message)
        sid, token = started["session_id"], started["session_token"]
        assert started["playlist_key"].startswith("tenants/alpha/sessions/")
        metrics = httpx.get(tenants_service.url + "/metrics").text
        assert 'histream_tenant_active_sessions{kind="session",tenant="alpha"} 1.0' in metrics
        held = re.search(r'histream_stage_bytes\{kind="held",replica="[^"]+",stage="RefineStage"\}'
                         r" ([0-9.e+]+)", metrics)  # fmt: skip
        assert held and float(held.group(1)) > 0  # the session's exact cache bytes
        api, md = stub(service, keys["bravo"])
        update = api_pb2.UpdateSessionPromptRequest(session_id=sid, prompt="x", session_token=token)
        close = api_pb2.CloseSessionRequest(session_id=sid, session_token=token)
        resume = api_pb2.ResumeSessionRequest(session_id=sid, session_token=token, last_chunk=-1)
        for call in (
            lambda: api.UpdateSessionPrompt(update, metadata=md, timeout=30),
            lambda: api.CloseSession(close, metadata=md, timeout=30),
            lambda: list(api.ResumeSession(resume, metadata=md, timeout=30)),
        ):
            assert grpc_code(call) == grpc.StatusCode.NOT_FOUND
        with connect(ws_url(tenants_service), additional_headers=bearer(keys["bravo"])) as other:
            other.send(json.dumps({"type": "resume", "session_id": sid, "session_token": token,
                                   "last_chunk": -1}))  # fmt: skip
            refused = json.loads(other.recv(timeout=30))
        assert (refused["type"], refused["code"]) == ("error", "not_found")
        # alpha's session went on untouched
        ended = None
        while ended is None:
            message = ws.recv(timeout=120)
            if isinstance(message, str) and '"session.ended"' in message:
                ended = json.loads(message)
    assert ended == {"type": "session.ended", "reason": "completed"}


def test_a_tenant_over_its_quotas_is_told_which_and_others_are_not(service, tenants_service):
    keys = tenants_service.keys
    bravo = openai.OpenAI(base_url=f"{tenants_service.url}/v1", api_key=keys["bravo"],
                          max_retries=0)  # fmt: skip
    with pytest.raises(openai.RateLimitError) as err:
        bravo.videos.create(prompt=PROMPT, seconds="3", size="128x64")  # 57 frames
    assert err.value.body["code"] == "quota_exceeded"
    assert "at most 33 frames (max_frames quota); this request asks for 57" in str(err.value)
    with connect(ws_url(tenants_service), additional_headers=bearer(keys["bravo"])) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "num_frames": 9}))
        refused = json.loads(ws.recv(timeout=30))
    assert (refused["type"], refused["code"]) == ("error", "quota_exceeded")
    assert "max_sessions quota: 0 of 0 sessions open" in refused["message"]
    assert refused["retry_after_s"] == 5
    api, md = stub(service, keys["bravo"])
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, num_frames=9)
    code = grpc_code(lambda: list(api.StreamSession(request, metadata=md, timeout=30)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    usage = httpx.get(tenants_service.url + "/v1/usage", headers=bearer(keys["bravo"])).json()
    assert usage["tenant"] == "bravo" and usage["quotas"]["max_frames"] == 33
    assert usage["usage"] == {"sessions": 0, "videos": 0, "frames_last_hour": 0}
    # alpha has no quotas: the same request is taken
    alpha = httpx.get(tenants_service.url + "/v1/usage", headers=bearer(keys["alpha"])).json()
    assert alpha["quotas"]["max_frames"] is None


def test_a_byte_budget_of_one_session_runs_one_and_queues_the_next(tenants_service):
    """The tenants app's stage budget is exactly one 128x64 session's bytes on the refine
    stage: of two sessions started at once, one waits (`queued`) until the other ends; both
    complete, and no stage is ever asked to hold more than its budget."""
    import threading

    key = tenants_service.keys["alpha"]
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 57}
    seen: dict[int, list[str]] = {0: [], 1: []}

    def run(n: int) -> None:
        with connect(ws_url(tenants_service), additional_headers=bearer(key)) as ws:
            ws.send(json.dumps(start))
            while True:
                message = ws.recv(timeout=120)
                if isinstance(message, str):
                    event = json.loads(message)
                    seen[n].append(event["type"] if event["type"] != "session.ended"
                                   else event["reason"])  # fmt: skip
                    if event["type"] in ("session.ended", "error"):
                        return

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert seen[0][-1] == seen[1][-1] == "completed", seen
    waited = [n for n in (0, 1) if "queued" in seen[n]]
    assert len(waited) == 1, seen  # one ran at once, the other waited for its bytes
    assert seen[waited[0]].index("queued") < seen[waited[0]].index("session.started")
