"""The WebSocket route when a session fails with something that is not a service error (a bug,
or a stage's unexpected exception): the client gets an `error` event with an error id and a
1011 close, not a connection dropped without a close frame (CI saw the latter when a decode
replica's stale stream raised a ValueError through Ray). Fault injection: the gateway core's
stream registry is replaced by one whose events fail."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from services.errors import NotFound
from services.gateway.websocket import WebSocketApi
from services.settings import ServeSettings


class FakeSocket:
    """What the route uses of a starlette WebSocket; the client sends `start`, then waits."""

    def __init__(self, start: dict) -> None:
        self.headers: dict[str, str] = {}
        self.inbox = [{"type": "websocket.receive", "text": json.dumps(start)}]
        self.sent: list[dict] = []
        self.closed: list[int] = []

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        if self.inbox:
            return self.inbox.pop(0)
        await asyncio.Event().wait()  # the client says nothing more
        raise AssertionError("unreachable")

    async def send_json(self, message: dict) -> None:
        self.sent.append(message)

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self, code: int = 1000) -> None:
        self.closed.append(code)


class FailingStreams:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def open(self, body, tenant):
        return SimpleNamespace(id="sess_test", request_stop=lambda reason: None)

    async def events(self, live):
        raise self.error
        yield  # an async generator


def run_route(error: Exception) -> FakeSocket:
    api = WebSocketApi()
    api.core = SimpleNamespace(  # type: ignore[assignment]
        settings=ServeSettings(preset="tiny"), caller=lambda authorization: "default",
        streams=FailingStreams(error),
    )  # fmt: skip
    ws = FakeSocket({"type": "start", "prompt": "a fox", "num_frames": 21})
    asyncio.run(WebSocketApi.session_socket(api, ws))
    return ws


def test_an_unexpected_failure_is_an_internal_error_event_and_a_1011_close():
    ws = run_route(ValueError("segment index 8 out of order; expected 6"))
    assert len(ws.sent) == 1 and ws.closed == [1011]
    event = ws.sent[0]
    assert (event["type"], event["code"]) == ("error", "internal_error")
    assert "quote err_" in event["message"] and "segment index" not in event["message"]


def test_a_service_error_keeps_its_code_and_a_client_mistake_closes_1008():
    ws = run_route(NotFound("no session 'sess_test'"))
    assert ws.sent == [{"type": "error", "code": "not_found", "message": "no session "
                        "'sess_test'", "param": None}]  # fmt: skip
    assert ws.closed == [1008]
