"""The distributed service on a local Ray (tiny preset): the OpenAI Videos API, the pipeline's
latents against the in-process generator over both stage transports, storage, gRPC video calls,
health and metrics, bad input over HTTP and gRPC, and batches. Sessions:
test_service_sessions.py."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest
import torch
from websockets.sync.client import connect

from histream_model.config import MODES, get_mode, get_preset
from histream_model.shape import VideoShape
from protos.histream.v1 import api_pb2
from services.media import read_video
from services.protocol import StreamKind, from_proto
from services.sessions import SessionDriver, SessionPlan
from tests.services.service_calls import (
    OTHER,
    OTHER_SEEDS,
    PROMPT,
    H,
    W,
    client,
    grpc_stub,
    held_sessions,
    in_process,
    metric,
    name_field,
    stage,
    stage_calls,
    transport_handles,
    wait_until,
    wait_video,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_openai_client_end_to_end_with_presigned_s3_content(service, tmp_path):
    api = client(service.url)
    video = api.videos.create(
        prompt=PROMPT, seconds="2", size=f"{W}x{H}", extra_body={"seed": 7, "mode": "histream"}
    )
    assert (video.status, video.object, video.model) == ("queued", "video", "tiny")
    done = wait_video(api, video.id)
    assert done.status == "completed", done.error
    assert done.progress == 100 and done.seconds == "2" and done.size == "192x128"
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at

    # objects and manifest in the S3 bucket; the manifest describes the stored MP4 exactly
    prefix = f"tenants/default/videos/{video.id}/"
    keys = service.s3.list(prefix)
    assert keys == [prefix + "manifest.json", prefix + "record.json", prefix + "video.mp4"]
    manifest = json.loads(service.s3.get(prefix + "manifest.json"))
    mp4 = service.s3.get(prefix + "video.mp4")
    [entry] = manifest["objects"]
    assert entry["size"] == len(mp4) and manifest["num_frames"] == 33 and manifest["seed"] == 7

    # the content endpoint hands out a presigned URL that downloads the MP4 over plain HTTP
    raw = httpx.get(f"{service.url}/v1/videos/{video.id}/content")
    assert raw.status_code == 307 and "X-Amz-Signature=" in raw.headers["location"]
    assert httpx.get(raw.headers["location"]).content == mp4

    # and the official client follows it
    path = tmp_path / "v.mp4"
    api.videos.download_content(video.id).write_to_file(path)
    assert read_video(path) == (33, W, H)  # 2 s at 16 fps -> 33 frames (1 + 4k, whole chunks)


def test_models_list_the_served_model_and_its_modes(service):
    api = client(service.url)
    models = list(api.models.list())
    assert [m.id for m in models] == ["tiny", *MODES]
    assert {m.object for m in models} == {"model"} and models[0].owned_by == "histream"
    assert api.models.retrieve("histream").id == "histream"
    with pytest.raises(openai.NotFoundError, match="no model with id 'sora-2'"):
        api.models.retrieve("sora-2")
    stub, md = grpc_stub(service)
    listed = stub.ListModels(api_pb2.ListModelsRequest(), metadata=md)
    assert [m.id for m in listed.data] == [m.id for m in models]

    # a listed mode id is a model a request may name: it picks that mode
    video = api.videos.create(prompt=PROMPT, model="no-drc", size="80x48", seconds="1")
    assert (video.model, video.size) == ("no-drc", "80x48")
    done = wait_video(api, video.id)
    assert done.status == "completed", done.error
    record = httpx.get(f"{service.url}/v1/videos/{video.id}").json()
    assert record["mode"] == "no-drc"


def test_local_storage_app_serves_content_itself(service, tmp_path):
    api = client(service.local_url)
    video = api.videos.create(prompt=PROMPT, size="128x96")
    done = wait_video(api, video.id)
    assert done.status == "completed", done.error
    path = tmp_path / "local.mp4"
    api.videos.download_content(video.id).write_to_file(path)
    assert read_video(path) == (81, 128, 96)
    stored = service.local.list(f"tenants/default/videos/{video.id}/")
    assert [k.rsplit("/", 1)[1] for k in stored] == ["manifest.json", "record.json", "video.mp4"]
    # README, *gRPC*: the `application` metadata picks the application; `histream` without it
    stub, md = grpc_stub(service, "local")
    request = api_pb2.GetVideoRequest(id=video.id)
    assert stub.GetVideo(request, metadata=md).status == "completed"
    for metadata in ((), (("application", "histream"),)):  # the other app: its own records
        with pytest.raises(grpc.RpcError) as err:
            stub.GetVideo(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_and_delete_videos(service):
    api = client(service.url)
    first = api.videos.create(prompt=PROMPT, seconds="1")
    second = api.videos.create(prompt=OTHER, seconds="1")
    assert wait_video(api, first.id).status == "completed"
    listed = httpx.get(f"{service.url}/v1/videos", params={"limit": 100}).json()
    ids = [v["id"] for v in listed["data"]]
    assert first.id in ids and second.id in ids and listed["object"] == "list"
    created = [v["created_at"] for v in listed["data"]]
    assert created == sorted(created, reverse=True)  # newest first by default

    deleted = httpx.delete(f"{service.url}/v1/videos/{second.id}").json()  # maybe still running
    assert deleted == {"id": second.id, "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{service.url}/v1/videos/{second.id}").status_code == 404
    assert wait_until(lambda: service.s3.list(f"tenants/default/videos/{second.id}/") == [])
    # a cancelled job must not write anything afterwards: once it has stopped (its caches on
    # the stages freed), its folder is still empty
    assert wait_until(lambda: held_sessions() == 0)
    assert service.s3.list(f"tenants/default/videos/{second.id}/") == []


@pytest.mark.parametrize("transport", ["handle", "grpc"])
@pytest.mark.parametrize("mode", ["histream", "histream+", *OTHER_SEEDS])
def test_distributed_latents_equal_in_process_bit_exact(service, mode, transport):
    """Bit for bit the in-process generator's latents, over either stage transport."""
    preset = get_preset("tiny")
    shape = VideoShape(preset, get_mode(mode), H, W, 33)
    handles = transport_handles(service, transport)
    plan = SessionPlan(
        f"test-{mode.replace('+', 'p')}", StreamKind.VIDEO, "default", shape, 5, PROMPT, 16
    )

    async def run() -> list[torch.Tensor]:
        driver = SessionDriver(handles, plan)
        await driver.open()
        try:
            return [from_proto(c.latents) async for c in driver.chunks()]
        finally:
            await driver.close()

    distributed = asyncio.run(run())
    expected = in_process(mode, 33, seed=5)
    assert len(distributed) == len(expected) == 3
    for got, want in zip(distributed, expected, strict=True):
        assert torch.equal(got, want)
    if transport == "grpc":  # the calls went to the replicas' gRPC servers
        for name in ("StructureStage", "RefineStage", "DecodePool"):
            address = stage(name, "local").StageAddress.remote().result()
            assert address in getattr(handles, name_field(name)).channels.targets()
        # and so did the refine stage's hand-offs to the structure stage
        assert stage("RefineStage", "local").stats.remote().result()["link_bytes"] > 0
    assert wait_until(lambda: held_sessions("local" if transport == "grpc" else "histream") == 0)


def test_other_seeds_through_the_video_api(service, tmp_path):
    api = client(service.url)
    video = api.videos.create(
        prompt=PROMPT, seconds="2", size=f"{W}x{H}", extra_body={"seed": 1, "mode": "hiar"}
    )
    done = wait_video(api, video.id)
    assert done.status == "completed", done.error
    record = json.loads(service.s3.get(f"tenants/default/videos/{video.id}/record.json"))
    assert record["mode"] == "hiar"
    path = tmp_path / "hiar.mp4"
    api.videos.download_content(video.id).write_to_file(path)
    assert read_video(path) == (33, W, H)
    # a mode id is also a model id, described
    assert api.models.retrieve("histream-diagonal").id == "histream-diagonal"
    described = httpx.get(f"{service.url}/v1/models/hiar").json()
    assert described["mode"] == "hiar" and described["description"].startswith("HiAR: 4 high")


def test_grpc_video_lifecycle(service):
    stub, md = grpc_stub(service)
    video = stub.CreateVideo(api_pb2.CreateVideoRequest(prompt=PROMPT, seconds="1"), metadata=md)
    assert video.status == "queued" and video.num_frames == 21
    deadline = time.monotonic() + 60
    while video.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        video = stub.GetVideo(api_pb2.GetVideoRequest(id=video.id), metadata=md)
    assert video.status == "completed"
    listed = stub.ListVideos(api_pb2.ListVideosRequest(limit=100, order="asc"), metadata=md)
    assert video.id in [v.id for v in listed.data]
    created = [v.created_at for v in listed.data]
    assert created == sorted(created)  # asc: oldest first
    newest = stub.ListVideos(api_pb2.ListVideosRequest(limit=100, order="desc"), metadata=md)
    latest = [v.created_at for v in newest.data]
    assert latest == sorted(latest, reverse=True) and video.id in [v.id for v in newest.data]
    if not listed.has_more:  # the whole list both ways: one is the other reversed
        assert [v.id for v in newest.data] == [v.id for v in listed.data][::-1]
    gone = stub.DeleteVideo(api_pb2.DeleteVideoRequest(id=video.id), metadata=md)
    assert gone.deleted and gone.object == "video.deleted"
    with pytest.raises(grpc.RpcError) as missing:  # deleted means gone
        stub.GetVideo(api_pb2.GetVideoRequest(id=video.id), metadata=md)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    after = stub.ListVideos(api_pb2.ListVideosRequest(limit=100, order="asc"), metadata=md)
    assert video.id not in [v.id for v in after.data]


def test_health_and_metrics(service):
    assert httpx.get(f"{service.url}/healthz").json() == {
        "status": "ok",
        "model": "tiny",
        "preset": "tiny",
    }
    text = httpx.get(f"{service.url}/metrics").text
    for name in ("histream_requests_total", "histream_chunk_seconds_bucket",
                 "histream_active_sessions", "histream_cache_bytes"):  # fmt: skip
        assert name in text
    # the request counter counts what was asked, by route template, method and status
    ok = '{code="200",method="GET",route="/v1/models"}'  # labels sorted, as exposed
    missing = '{code="404",method="GET",route="/v1/videos/{video_id}"}'

    def count(labels: str) -> float:
        try:
            return metric(service.url, "histream_requests_total", labels)
        except AssertionError:  # not asked yet
            return 0.0

    before = count(ok), count(missing)
    for _ in range(3):
        assert httpx.get(f"{service.url}/v1/models").status_code == 200
    assert httpx.get(f"{service.url}/v1/videos/video_nope").status_code == 404
    assert (count(ok), count(missing)) == (before[0] + 3, before[1] + 1)


BAD_VIDEOS = [
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"prompt": "x" * 2001}, "prompt", "the limit is 2000"),
    ({"prompt": PROMPT, "size": "100x128"}, "size", "width=100 must be a positive multiple of 32"),
    ({"prompt": PROMPT, "size": "512x512"}, "size", "above this model's maximum 384x256"),
    ({"prompt": PROMPT, "size": "big"}, "size", "must look like 'WIDTHxHEIGHT'"),
    ({"prompt": PROMPT, "seconds": "0"}, "seconds", "seconds=0 must be in [1, 29]"),
    ({"prompt": PROMPT, "seconds": "30"}, "seconds", "seconds=30 must be in [1, 29]"),
    ({"prompt": PROMPT, "seconds": "two"}, "seconds", "whole number"),
    ({"prompt": PROMPT, "mode": "turbo"}, "mode", "mode 'turbo' is unknown"),
    ({"prompt": PROMPT, "model": "sora-2"}, "model", "model 'sora-2' is not served here"),
    ({"prompt": PROMPT, "seed": -1}, "seed", "seed=-1 must be in"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_VIDEOS)
def test_bad_video_requests_over_http(service, body, param, message):
    before = stage_calls()
    response = httpx.post(f"{service.url}/v1/videos", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert stage_calls() == before  # nothing reached a stage


def test_bad_video_request_through_the_openai_client(service):
    with pytest.raises(openai.BadRequestError, match="width=200"):
        client(service.url).videos.create(prompt=PROMPT, size="200x128")


@pytest.mark.parametrize(("body", "param", "message"), BAD_VIDEOS)
def test_bad_video_requests_over_grpc(service, body, param, message):
    stub, md = grpc_stub(service)
    fields = {k: v if k == "seed" else str(v) for k, v in body.items()}
    before = stage_calls()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVideo(api_pb2.CreateVideoRequest(**fields), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert stage_calls() == before


def test_unknown_ids_are_not_found(service):
    assert httpx.get(f"{service.url}/v1/videos/video_nope").status_code == 404
    assert httpx.get(f"{service.url}/v1/videos/video_nope/content").status_code == 404
    assert httpx.delete(f"{service.url}/v1/videos/video_nope").status_code == 404
    stub, md = grpc_stub(service)
    for rpc, request in (
        (stub.GetVideo, api_pb2.GetVideoRequest(id="video_nope")),
        (stub.DeleteVideo, api_pb2.DeleteVideoRequest(id="video_nope")),
        (
            stub.UpdateSessionPrompt,
            api_pb2.UpdateSessionPromptRequest(session_id="s", prompt="x", session_token="t"),
        ),
        (stub.CloseSession, api_pb2.CloseSessionRequest(session_id="sess_nope", session_token="t")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request, metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_session_starts(service):
    before = stage_calls()
    with connect(f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions") as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "num_frames": 80}))
        error = json.loads(ws.recv(timeout=30))
    assert error["type"] == "error" and "num_frames=80 must be one of 9, 21" in error["message"]
    stub, md = grpc_stub(service)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamSession(api_pb2.StreamSessionRequest(prompt=""), metadata=md))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stage_calls() == before


def test_a_batch_through_the_openai_client(service, tmp_path):
    """The official client's Files and Batches calls: upload a JSONL of /v1/videos requests
    (one of them bad), create the batch, follow it, read its output and error files, download
    a video the output names."""
    api = client(service.url)
    requests = [
        {"custom_id": "fox", "method": "POST", "url": "/v1/videos",
         "body": {"prompt": PROMPT, "seconds": "1", "size": "96x64", "seed": 4}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/videos",
         "body": {"prompt": PROMPT, "seconds": "99"}},
        {"custom_id": "owl", "method": "POST", "url": "/v1/videos",
         "body": {"prompt": "an owl at dusk", "seconds": "1", "size": "96x64", "seed": 5}},
    ]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "batch", path.name)
    batch = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h",
        metadata={"run": "test"},
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = api.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    output = [json.loads(x) for x in api.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in api.files.content(batch.error_file_id).text.splitlines()]
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1), errors
    assert batch.metadata == {"run": "test"}
    assert batch.id in [b.id for b in api.batches.list(limit=100).data]
    assert [o["custom_id"] for o in output] == ["fox", "owl"]
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [("bad", 2)]
    assert "seconds" in errors[0]["error"]["message"]
    video_id = output[0]["response"]["body"]["id"]
    mp4 = tmp_path / "fox.mp4"
    api.videos.download_content(video_id).write_to_file(mp4)
    assert read_video(mp4) == (21, 96, 64)


def test_histream_batch_submits_follows_and_downloads(service, tmp_path, capsys):
    from services.local.cli import main

    lines = [
        {"custom_id": "a/1", "method": "POST", "url": "/v1/videos",
         "body": {"prompt": PROMPT, "seconds": "1", "size": "96x64", "seed": 1}},
        {"custom_id": "b", "method": "POST", "url": "/v1/videos", "body": {"prompt": ""}},
    ]  # fmt: skip
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    code = main(["batch", str(requests), "--out", str(out), "--url", service.url])
    assert code == 0
    assert "1 completed, 1 failed of 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_1.mp4", "errors.jsonl", "output.jsonl"]
    assert read_video(out / "a_1.mp4") == (21, 96, 64)
    [error] = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert error["custom_id"] == "b" and error["error"]["line"] == 2
