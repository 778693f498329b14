"""Files, batches, API keys and the player page over HTTP, without Ray (README, *Batch jobs*,
*Tenants*, *The web player*): the gateway's routes over the real in-process stages through
Starlette's TestClient. An uploaded JSONL file is listed, read back and deleted; a batch of it
runs every line to a video and writes an output file; with a tenants file a call without a
valid key is a 401 (HTTP) or an error and a 1008 (WebSocket) before any work."""

from __future__ import annotations

import json
import time

import pytest

from tests.services.fakes import real_stages
from tests.services.gateway.local_app import gateway_client, settings_for
from tests.services.gateway.test_http import error_of
from tests.services.gateway.test_websocket_api import START, Player, receive

KEY = "sk-alpha-0123456789"
BRAVO = "sk-bravo-0123456789"


@pytest.fixture
def gateway(tmp_path):
    stages = real_stages(tmp_path)
    with gateway_client(settings_for(tmp_path), stages.handles) as (client, _):
        yield client


def line(custom_id: str, **body) -> dict:
    body = {"prompt": "a red fox", "seconds": "1", "size": "96x64", **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/videos", "body": body}


def upload(client, lines: list[dict], purpose: str = "batch"):
    data = "\n".join(json.dumps(x) for x in lines).encode()
    files = {"file": ("in.jsonl", data, "application/jsonl")}
    return client.post("/v1/files", data={"purpose": purpose}, files=files)


def test_a_file_is_uploaded_listed_read_back_and_deleted(gateway):
    lines = [line("a"), line("b", seed=2)]
    made = upload(gateway, lines)
    assert made.status_code == 200, made.text
    file = made.json()
    assert (file["object"], file["filename"], file["purpose"]) == ("file", "in.jsonl", "batch")
    assert file["id"].startswith("file-") and file["status"] == "processed"
    content = gateway.get(f"/v1/files/{file['id']}/content")
    assert content.headers["content-type"] == "application/jsonl"
    assert [json.loads(x) for x in content.text.splitlines()] == lines
    assert file["bytes"] == len(content.content)
    assert gateway.get(f"/v1/files/{file['id']}").json() == file
    listed = gateway.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [file["id"]]
    deleted = gateway.delete(f"/v1/files/{file['id']}").json()
    assert deleted == {"id": file["id"], "object": "file", "deleted": True}
    assert error_of(gateway.get(f"/v1/files/{file['id']}"), 404)["code"] == "not_found"


def test_an_upload_is_multipart_with_a_file_part(gateway):
    as_json = gateway.post("/v1/files", json={"purpose": "batch"})
    assert "multipart/form-data with fields file and purpose" in error_of(as_json, 400)["message"]
    no_file = gateway.post("/v1/files", files={"purpose": (None, "batch")})
    assert error_of(no_file, 400)["param"] == "file"
    bad_field = gateway.post(
        "/v1/files", files={"purpose": (None, b"\xff"), "file": ("a.jsonl", b"{}", "text/plain")}
    )
    error = error_of(bad_field, 400)
    assert error["param"] == "purpose" and "not valid UTF-8" in error["message"]
    assert error_of(upload(gateway, [line("a")], purpose="fine-tune"), 400)["param"] == "purpose"


def test_a_batch_runs_every_line_and_writes_its_output_file(gateway):
    file = upload(gateway, [line("a"), line("b", seed=2)]).json()
    created = gateway.post(
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": "/v1/videos", "completion_window": "24h"},
    )
    assert created.status_code == 200, created.text
    batch = created.json()
    assert (batch["object"], batch["input_file_id"]) == ("batch", file["id"])
    deadline = time.monotonic() + 120
    while batch["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = gateway.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    output = gateway.get(f"/v1/files/{batch['output_file_id']}/content").text
    results = {r["custom_id"]: r for r in map(json.loads, output.splitlines())}
    assert set(results) == {"a", "b"}
    for result in results.values():
        assert result["response"]["status_code"] == 200 and result["error"] is None
        video = gateway.get(f"/v1/videos/{result['response']['body']['id']}").json()
        assert (video["status"], video["size"]) == ("completed", "96x64")
    newer = gateway.post(
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": "/v1/videos", "completion_window": "24h"},
    ).json()
    listed = gateway.get("/v1/batches").json()["data"]
    assert [b["id"] for b in listed] == [newer["id"], batch["id"]]  # newest first
    gateway.post(f"/v1/batches/{newer['id']}/cancel")
    missing = gateway.post(
        "/v1/batches", json={"endpoint": "/v1/videos", "completion_window": "24h"}
    )
    assert error_of(missing, 400)["param"] == "input_file_id"


def test_the_player_page_carries_this_servers_settings(gateway):
    page = gateway.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
    assert page.headers["content-type"].startswith("text/html")
    assert "/*PLAYER_" not in page.text  # every asset and the settings are in place
    assert '"model": "tiny"' in page.text and '"tenancy": false' in page.text


@pytest.fixture
def tenants(tmp_path):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"alpha": {"keys": [KEY]}, "bravo": {"keys": [BRAVO]}}}))
    stages = real_stages(tmp_path)
    settings = settings_for(tmp_path, tenants_file=str(path))
    with gateway_client(settings, stages.handles) as (client, _):
        yield client


def test_with_a_tenants_file_every_call_needs_a_valid_key(tenants):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer "}):
        response = tenants.get("/v1/models", headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    refused = tenants.post("/v1/videos", json={"prompt": "a fox", "seconds": "1"})
    assert error_of(refused, 401)["code"] == "invalid_api_key"
    for authorization in (f"Bearer {KEY}", KEY):  # the bare key is taken too
        assert tenants.get("/v1/models", headers={"Authorization": authorization}).is_success
    assert (
        tenants.get("/v1/videos", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []
    )  # nothing was made by the refused call
    assert '"tenancy": true' in tenants.get("/").text  # the page asks for a key
    for probe in ("/healthz", "/readyz", "/metrics"):  # probes need none
        assert tenants.get(probe).status_code == 200, probe


def test_no_request_field_names_a_tenant_or_where_things_are_stored(tenants):
    alpha, bravo = ({"Authorization": f"Bearer {key}"} for key in (KEY, BRAVO))
    body = {"prompt": "a fox", "seconds": "1", "tenant": "bravo", "key": "tenants/bravo/x"}
    video = tenants.post("/v1/videos", json=body, headers=alpha).json()
    assert [v["id"] for v in tenants.get("/v1/videos", headers=alpha).json()["data"]] == [
        video["id"]
    ]
    assert tenants.get("/v1/videos", headers=bravo).json()["data"] == []
    other = tenants.get(f"/v1/videos/{video['id']}", headers=bravo)
    unknown = tenants.get("/v1/videos/video_0123", headers=bravo)
    assert error_of(other, 404)["code"] == error_of(unknown, 404)["code"] == "not_found"


def test_a_browser_session_authenticates_with_the_key_in_its_first_message(tenants):
    with tenants.websocket_connect("/v1/sessions") as ws:
        ws.send_json({**START, "num_frames": 9, "api_key": "sk-wrong"})
        error = receive(ws)
        assert receive(ws) is None  # closed
    assert (error["type"], error["code"]) == ("error", "invalid_api_key")
    player = Player()
    with tenants.websocket_connect("/v1/sessions") as ws:
        ws.send_json({**START, "num_frames": 9, "api_key": KEY})
        ended = player.read(ws)
    assert ended == {"type": "session.ended", "reason": "completed"}
    assert len(player.of("chunk")) == 1


def test_an_upload_over_max_file_bytes_is_refused(tmp_path):
    assert settings_for(tmp_path).max_file_bytes == 64 * 2**20  # the default README states
    settings = settings_for(tmp_path, max_file_bytes=2048)
    with gateway_client(settings, real_stages(tmp_path).handles) as (client, _):
        big = upload(client, [line(f"v{i}") for i in range(40)])
        fits = upload(client, [line("v")])
    error = error_of(big, 413)
    assert error["code"] == "request_too_large" and "2048" in error["message"]
    assert fits.status_code == 200
