"""WebSocket sessions without Ray (README, *Streaming sessions*): the gateway's `/v1/sessions`
route over the real stages in this process (tiny preset), through Starlette's TestClient. A
session streams its init segment and every chunk in order, then ends; a prompt sent mid-session
is accepted and applied from a later chunk; a close ends it; a client that drops resumes by id
and gets every later chunk once; a first message that starts nothing is an error and a 1008."""

from __future__ import annotations

import json
import re

import anyio
import pytest

from services.media import read_video
from tests.services.fakes import real_stages
from tests.services.gateway.local_app import gateway_client, settings_for

START = {"type": "start", "prompt": "a cat runs", "size": "128x64", "num_frames": 57, "seed": 4}
CHUNKS = 5  # 57 frames: 15 latent frames, 3 a chunk


@pytest.fixture
def gateway(tmp_path):
    stages = real_stages(tmp_path)
    with gateway_client(settings_for(tmp_path), stages.handles) as (client, _):
        yield client, stages


def receive(ws, timeout_s: float = 60) -> dict | bytes | None:
    """The next message: an event, a media segment, or None once the server closed."""

    async def next_message() -> dict:
        with anyio.fail_after(timeout_s):
            return await ws._send_rx.receive()  # TestClient's own receive() has no timeout

    message = ws.portal.call(next_message)
    if message["type"] == "websocket.close":
        return None
    if message.get("text") is not None:
        return json.loads(message["text"])
    return message["bytes"]


class Player:
    """What a client keeps: events by type, the init segment, each chunk's media by index."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.init = b""
        self.media: dict[int, bytes] = {}

    def read(self, ws, until: str = "session.ended", index: int | None = None) -> dict:
        """Messages until an event of type `until` (a chunk: the one at `index`, with its
        media) arrives; returns it."""
        while (message := receive(ws)) is not None:
            if isinstance(message, bytes):
                last = self.events[-1]
                if last["type"] == "init":
                    self.init = message
                else:
                    assert last["index"] not in self.media, "a chunk arrived twice"
                    self.media[last["index"]] = message
                    if until == "chunk" and last["index"] == index:
                        return last
                continue
            self.events.append(message)
            if message["type"] == until != "chunk" or message["type"] == "error":
                return message
        raise AssertionError(f"closed before {until}: {self.events[-3:]}")

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def frames(self, path) -> tuple[int, int, int]:
        path.write_bytes(self.init + b"".join(self.media[i] for i in sorted(self.media)))
        return read_video(path)


def test_a_session_streams_its_init_and_every_chunk_in_order_then_ends(gateway, tmp_path):
    client, _ = gateway
    player = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json(START)
        ended = player.read(ws)
        assert receive(ws) is None  # the server closes after the end
    assert ended == {"type": "session.ended", "reason": "completed"}
    started = player.events[0]
    assert started["type"] == "session.started" and not started["resumed"]
    assert (started["width"], started["height"], started["num_chunks"]) == (128, 64, CHUNKS)
    assert started["num_frames"] == 57 and started["session_token"]
    assert started["mode"] == "histream+" and not started["endless"]
    chunks = player.of("chunk")
    assert [c["index"] for c in chunks] == list(range(CHUNKS))
    assert all(c["bytes"] == len(player.media[c["index"]]) for c in chunks)
    assert [c["first_frame"] for c in chunks] == [0, 9, 21, 33, 45]
    assert sum(c["num_frames"] for c in chunks) == 57
    assert player.frames(tmp_path / "s.mp4") == (57, 128, 64)


def test_a_prompt_sent_mid_session_is_accepted_then_applied_from_a_later_chunk(gateway):
    client, _ = gateway
    player = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json(START)
        player.read(ws, "chunk", index=0)
        ws.send_json({"type": "prompt", "prompt": "a dog runs"})
        accepted = player.read(ws, "prompt.accepted")
        player.read(ws)
    assert accepted["prompt_version"] == 1 and 1 <= accepted["from_chunk"] < CHUNKS
    applied = player.of("prompt.applied")
    assert applied == [{"type": "prompt.applied", **{k: accepted[k] for k in applied[0]
                                                      if k != "type"}}]  # fmt: skip
    versions = [c["prompt_version"] for c in player.of("chunk")]
    start = accepted["from_chunk"]
    assert versions == [0] * start + [1] * (CHUNKS - start)


def test_a_close_ends_the_session_and_frees_the_stages(gateway):
    client, stages = gateway
    player = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json({**START, "num_frames": 201})
        player.read(ws, "chunk", index=0)
        ws.send_json({"type": "close"})
        ended = player.read(ws)
    assert ended == {"type": "session.ended", "reason": "closed"}
    assert len(player.of("chunk")) < 17  # 201 frames would be 17
    assert stages.held() == {"structure": 0, "refine": 0, "decode": 0}


def test_a_dropped_client_resumes_by_id_and_gets_every_later_chunk_once(gateway, tmp_path):
    client, _ = gateway
    player = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json(START)
        player.read(ws, "chunk", index=1)
    # the client is gone (its connection closed) after chunk 1: it comes back with the id
    started = player.events[0]
    resume = {"type": "resume", "session_id": started["session_id"], "last_chunk": 1,
              "session_token": started["session_token"]}  # fmt: skip
    again = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json(resume)
        ended = again.read(ws)
    assert ended == {"type": "session.ended", "reason": "completed"}
    resumed = again.of("session.started")[0]
    assert resumed["resumed"] and resumed["session_id"] == started["session_id"]
    assert again.init == player.init  # the init segment again, for a player starting over
    assert [c["index"] for c in again.of("chunk")] == list(range(2, CHUNKS))
    player.media.update(again.media)
    assert player.frames(tmp_path / "resumed.mp4") == (57, 128, 64)


@pytest.mark.parametrize(
    ("first", "code", "param", "message"),
    [
        ({"type": "prompt", "prompt": "x"}, "invalid_value", "type", "the first message must"),
        ("not json", "invalid_value", None, "the message is not valid JSON"),
        (b"\x00\x01", "invalid_value", None, "binary messages are not accepted"),
        ({"type": "resume"}, "invalid_value", "session_id", "session_id is required"),
        ({"type": "resume", "session_id": "s", "last_chunk": "2"}, "invalid_value",
         "last_chunk", "last_chunk must be an integer"),
        ({"type": "resume", "session_id": "sess_nope", "session_token": "t"}, "not_found",
         None, "sess_nope"),
        ({**START, "size": "100x100"}, "invalid_value", "size", "100x100"),
        ({**START, "api_key": 7}, "invalid_value", "api_key", "api_key must be a string"),
    ],
)  # fmt: skip
def test_a_first_message_that_starts_nothing_is_an_error_then_a_1008_close(
    gateway, first, code, param, message
):
    client, _ = gateway
    with client.websocket_connect("/v1/sessions") as ws:
        if isinstance(first, bytes):
            ws.send_bytes(first)
        elif isinstance(first, str):
            ws.send_text(first)
        else:
            ws.send_json(first)
        error = receive(ws)
        closed = ws.portal.call(ws._send_rx.receive)
    assert (error["type"], error["code"]) == ("error", code), error
    assert message in error["message"] and (param is None or error["param"] == param), error
    assert closed == {"type": "websocket.close", "code": 1008, "reason": ""}


def test_a_recache_rebuilds_the_denoisers_caches_and_counts_as_a_restore(gateway):
    """README, *Streaming sessions*: `recache: true` rebuilds the denoisers' caches under the
    new prompt by the restore path, so it counts in `histream_restore_seconds`."""
    client, stages = gateway

    def restores() -> dict[str, float]:
        metrics = client.get("/metrics").text
        found = re.findall(r'histream_restore_seconds_count\{stage="(\w+)"\} ([0-9.]+)', metrics)
        return {stage: float(n) for stage, n in found}

    assert restores() == {}
    player = Player()
    with client.websocket_connect("/v1/sessions") as ws:
        ws.send_json(START)
        player.read(ws, "chunk", index=0)
        ws.send_json({"type": "prompt", "prompt": "a dog runs", "recache": True})
        accepted = player.read(ws, "prompt.accepted")
        player.read(ws)
    assert accepted["from_chunk"] >= 1
    assert restores() == {"StructureStage": 1.0, "RefineStage": 1.0}
    rebuilt = stages.journal.find("RestoreSession")
    assert {e.stage for e in rebuilt} == {"structure", "refine"}
