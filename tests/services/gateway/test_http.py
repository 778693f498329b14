"""The HTTP API without Ray (README, *The API*): the gateway's own routes over the real
structure, refine and decode stages in this process (tiny preset), through Starlette's
TestClient. What a client sends is read (JSON or form, size limits, UTF-8, nesting), a video
goes from queued to a real MP4 served whole or by byte range, lists page, and every error is
OpenAI's body with its status, an unexpected one a 500 with an error id, all counted."""

from __future__ import annotations

import re
import time

import av
import pytest

from tests.services.fakes import real_stages
from tests.services.gateway.local_app import gateway_client, settings_for

PROMPT = "a cat runs on the grass"


@pytest.fixture
def gateway(tmp_path):
    stages = real_stages(tmp_path)
    settings = settings_for(tmp_path, max_request_bytes=4096)
    with gateway_client(settings, stages.handles) as (client, core):
        yield client, core, stages


def finished(client, video_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} not finished within {timeout_s} s: {video}")


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_video_goes_from_queued_to_an_mp4_served_whole_and_by_range(gateway, tmp_path):
    client, _, _ = gateway
    created = client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1", "seed": 3})
    assert created.status_code == 200, created.text
    video = created.json()
    assert (video["object"], video["status"], video["progress"]) == ("video", "queued", 0)
    assert (video["size"], video["num_frames"], video["seed"]) == ("192x128", 21, 3)
    done = finished(client, video["id"])
    assert (done["status"], done["progress"]) == ("completed", 100)
    whole = client.get(f"/v1/videos/{video['id']}/content")
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    (tmp_path / "v.mp4").write_bytes(whole.content)
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (128, 192, 3)

    size, url = len(whole.content), f"/v1/videos/{video['id']}/content"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    rest = client.get(url, headers={"Range": f"bytes={size - 5}-"})
    assert rest.content == whole.content[-5:]
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    odd = client.get(url, headers={"Range": "items=0-1"})  # a form not served: the whole file
    assert odd.status_code == 200 and odd.content == whole.content
    error = error_of(client.get(url, params={"variant": "thumbnail"}), 400)
    assert error["param"] == "variant" and "only 'video'" in error["message"]


def test_content_asked_for_before_completion_is_not_found_and_names_the_status(gateway):
    client, _, stages = gateway
    gate = stages.decode.gate("DecodeChunk")
    video = client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}).json()
    client.portal.call(stages.journal.reached, "DecodeChunk")  # the job is at its first decode
    error = error_of(client.get(f"/v1/videos/{video['id']}/content"), 404)
    assert error["code"] == "not_found" and error["param"] == "video_id"
    assert (
        f"video {video['id']!r} is in_progress; content exists once completed" in (error["message"])
    )
    client.portal.call(gate.set)
    assert finished(client, video["id"])["status"] == "completed"
    assert client.get(f"/v1/videos/{video['id']}/content").status_code == 200


def test_form_bodies_are_read_like_json(gateway):
    client, _, _ = gateway
    fields = {"prompt": PROMPT, "seconds": "1", "seed": "9"}
    urlencoded = client.post("/v1/videos", data=fields).json()
    multipart = client.post("/v1/videos", files={k: (None, v) for k, v in fields.items()}).json()
    for video in (urlencoded, multipart):
        assert (video["prompt"], video["seconds"], video["seed"]) == (PROMPT, "1", 9)
    with_file = client.post(
        "/v1/videos", data=fields, files={"input_reference": ("a.png", b"\x89PNG", "image/png")}
    )
    error = error_of(with_file, 400)
    assert error["param"] == "input_reference" and "text-to-video only" in error["message"]
    no_boundary = client.post(
        "/v1/videos", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert "boundary missing" in error_of(no_boundary, 400)["message"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "the limit is 4096"),
        (b'{"prompt": "caf\xe9"}', 400, "the body is not valid UTF-8 (byte 15)"),
        (b"[" * 17 + b"]" * 17, 400, "nests JSON deeper than 16 levels"),
        (b'["a", "list"]', 400, "the body must be a JSON object"),
        (b'{"prompt": ', 400, "the body is not valid JSON"),
        (b'{"prompt": "[[[[[[[[[[[[[[[[[[", "seconds": "1"}', 200, None),  # brackets in a string
    ],
)
def test_a_body_is_refused_for_its_size_encoding_nesting_or_shape(gateway, body, status, message):
    client, _, _ = gateway
    response = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    if message is None:
        assert response.status_code == status, response.text
    else:
        assert message in error_of(response, status)["message"]


def test_a_body_streamed_past_the_limit_is_refused_without_a_length(gateway):
    client, _, _ = gateway

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/v1/videos", content=chunks())  # chunked: no Content-Length
    error = error_of(response, 413)
    assert (error["code"], error["message"]) == (
        "request_too_large", "the body passes the limit of 4096 bytes"
    )  # fmt: skip


def test_lists_page_in_either_order_and_a_deleted_video_is_gone(gateway):
    client, _, _ = gateway
    made = [client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}).json()["id"]]
    made += [client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}).json()["id"]]
    made += [client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}).json()["id"]]
    first = client.get("/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in first["data"]] == made[::-1][:2] and first["has_more"]
    assert (first["object"], first["first_id"], first["last_id"]) == ("list", made[2], made[1])
    second = client.get("/v1/videos", params={"limit": 2, "after": first["last_id"]}).json()
    assert [v["id"] for v in second["data"]] == [made[0]] and not second["has_more"]
    oldest = client.get("/v1/videos", params={"order": "asc"}).json()
    assert [v["id"] for v in oldest["data"]] == made
    assert error_of(client.get("/v1/videos", params={"limit": 0}), 400)["param"] == "limit"
    assert error_of(client.get("/v1/videos", params={"order": "up"}), 400)["param"] == "order"
    assert error_of(client.get("/v1/videos", params={"after": "video_x"}), 404)["param"] == "after"

    for video_id in made:
        finished(client, video_id)
    deleted = client.delete(f"/v1/videos/{made[0]}").json()
    assert deleted == {"id": made[0], "object": "video.deleted", "deleted": True}
    assert error_of(client.get(f"/v1/videos/{made[0]}"), 404)["code"] == "not_found"
    assert error_of(client.get(f"/v1/videos/{made[0]}/content"), 404)["code"] == "not_found"
    assert error_of(client.delete(f"/v1/videos/{made[0]}"), 404)["code"] == "not_found"
    assert [v["id"] for v in client.get("/v1/videos").json()["data"]] == made[:0:-1]


def test_models_list_the_served_model_then_its_modes(gateway):
    client, core, _ = gateway
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert {"histream+", "self-forcing"} <= {m["id"] for m in models["data"]}
    assert client.get("/v1/models/histream+").json()["mode"] == "histream+"
    error = error_of(client.get("/v1/models/sora-2"), 404)
    assert error["param"] == "model" and "GET /v1/models" in error["message"]
    assert core.models() == models["data"]


def test_an_unexpected_failure_is_a_500_with_an_error_id_and_every_answer_is_counted(
    gateway, monkeypatch, caplog
):
    client, core, _ = gateway

    async def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(core.videos, "get", broken)
    error = error_of(client.get("/v1/videos/video_1"), 500)
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    error_id = re.search(r"quote (err_[0-9a-f]{16})", error["message"]).group(1)
    assert "disk on fire" not in error["message"]  # details stay in the server's log
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    client.get("/v1/models/nope")
    client.get("/v1/models")
    metrics = client.get("/metrics").text
    counted = {}
    for labels, n in re.findall(r"histream_requests_total\{(.*)\} ([0-9.]+)", metrics):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counted[label["route"], label["code"]] = float(n)
    assert counted[("/v1/videos/{video_id}", "500")] == 1
    assert counted[("/v1/models/{model_id}", "404")] == 1
    assert counted[("/v1/models", "200")] == 1


def test_health_answers_and_readiness_asks_storage_and_each_stage(gateway):
    client, _, _ = gateway
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny", "preset": "tiny"}
    ready = client.get("/readyz")
    checks = {"storage": "ok", "StructureStage": "ok", "RefineStage": "ok", "DecodePool": "ok"}
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": checks}


def test_a_draining_gateway_admits_nothing_new(gateway):
    """README, *Sessions that survive*: during a drain no new job or session is admitted (503,
    or an error event); what was stored stays readable."""
    client, core, _ = gateway
    video = client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}).json()
    finished(client, video["id"])
    assert client.portal.call(core.drain, 5) == {"sessions": 0, "jobs": 0}
    refused = error_of(client.post("/v1/videos", json={"prompt": PROMPT, "seconds": "1"}), 503)
    assert refused["code"] == "service_unavailable" and "submit the job again" in refused["message"]
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json({"type": "start", "prompt": PROMPT, "num_frames": 9})
        event = ws.receive_json()
    assert (event["type"], event["code"]) == ("error", "service_unavailable")
    assert "start the session again" in event["message"]
    assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "completed"


def test_serves_graceful_shutdown_of_a_gateway_replica_drains_it(tmp_path):
    """What Serve calls when it removes a gateway replica (a scale-down, a rolling update): its
    ingress wrapper awaits the deployment class's own `__del__`, which drains as SIGTERM does,
    once."""
    from services.gateway.core import GatewayCore
    from services.gateway.deployment import Gateway
    from tests.services.harness import run

    deployment = Gateway.__mro__[1]  # the class under Serve's ingress wrapper
    assert deployment.__module__ == "services.gateway.deployment" and "__del__" in vars(deployment)
    settings = settings_for(tmp_path, drain_timeout_s=5)

    async def go():
        replica = deployment.__new__(deployment)
        replica.core = GatewayCore(settings, real_stages(tmp_path).handles)
        replica.core.start_background()
        drained, real_drain = [], replica.core.drain

        async def drain(timeout_s):
            drained.append(timeout_s)
            return await real_drain(timeout_s)

        replica.core.drain = drain
        await replica.__del__()
        refused = None
        try:
            replica.core.streams.open(None, "default")
        except Exception as err:
            refused = err
        await replica.__del__()  # already drained: not again
        return drained, refused

    drained, refused = run(go())
    assert drained == [5]
    assert type(refused).__name__ == "Unavailable"  # nothing new is admitted
