"""The pipeline on a local Ray decoding on a standalone decode server over gRPC
(`decode_target`; README, *Stage transports*): no DecodePool deployment, the gateway's decode
calls over a real gRPC channel, the same latents as in process, health in /readyz."""

from __future__ import annotations

import json

import httpx
import pytest
from ray import serve
from websockets.sync.client import connect

from histream_model.config import get_preset
from services.link import StageServer
from services.protocol import digest, to_proto
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import LocalStorage, StorageSettings
from tests.services.service_calls import PROMPT, H, W, in_process, ws_events


@pytest.fixture(scope="module")
def linked(service, tmp_path_factory):
    """App "linked" under /linked: its decode stage is a StageServer in this process."""
    from services.local import server

    store = tmp_path_factory.mktemp("linked")
    storage = StorageSettings(local_dir=str(store))
    decoder = StageServer(
        DecodeStage(ServeSettings(preset="tiny", storage=storage)), "DecodeStage",
        "127.0.0.1:0", get_preset("tiny"),
    )  # fmt: skip
    port = decoder.start()
    settings = service.settings.model_copy(update={
        "storage": storage, "decode_target": f"127.0.0.1:{port}", "external_scaler": False,
        "pipeline_workers": 0,  # no HiAR step workers: two replica processes fewer to start
    })  # fmt: skip
    server.start(settings, app_name="linked", route_prefix="/linked")
    try:
        yield f"{service.url}/linked", LocalStorage(store)
    finally:
        serve.delete("linked")
        decoder.stop(grace_s=1)


def test_a_session_decodes_on_the_standalone_server_with_the_in_process_latents(service, linked):
    url, storage = linked
    deployments = serve.status().applications["linked"].deployments
    assert "DecodePool" not in deployments and "RefineStage" in deployments
    ready = httpx.get(f"{url}/readyz", timeout=30).json()
    assert ready["status"] == "ready" and ready["checks"]["DecodePool"] == "ok"
    start = {"type": "start", "prompt": PROMPT, "size": f"{W}x{H}", "num_frames": 45, "seed": 6}
    with connect(url.replace("http://", "ws://") + "/v1/sessions") as ws:
        ws.send(json.dumps(start))
        events = list(ws_events(ws))
    started = events[0][0]
    chunks = [m for m, _ in events if m["type"] == "chunk"]
    assert events[-1][0] == {"type": "session.ended", "reason": "completed"}
    expected = in_process("histream+", 45, seed=6)
    assert [m["latents_sha256"] for m in chunks] == [digest(to_proto(x)) for x in expected]
    prefix = f"tenants/default/sessions/{started['session_id']}/"
    assert (
        storage.exists(prefix + "seg-00004.m4s")
        and "ENDLIST" in storage.get(prefix + "playlist.m3u8").decode()
    )
