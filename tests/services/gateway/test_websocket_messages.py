"""A WebSocket session's client messages, without Ray (README, *Limits and overload* and
*Streaming sessions*): a message over `max_message_bytes` or faster than `max_message_rate` is
answered with an `error` event and not acted on, and the 8th such mistake (malformed, unknown,
too large or too fast: they all count) ends the session with `protocol_error`. The route's reader
runs against a fake socket and a fake session."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from services.gateway.websocket import MAX_PROTOCOL_ERRORS, WebSocketApi
from services.protocol import EndReason
from services.settings import ServeSettings


class Socket:
    """Hands out the client's messages, then the client goes away."""

    def __init__(self, messages: list[str]) -> None:
        self.inbox = [{"type": "websocket.receive", "text": m} for m in messages]

    async def receive(self) -> dict:
        for _ in range(3):  # a network read: tasks started by the last message run meanwhile
            await asyncio.sleep(0)
        return self.inbox.pop(0) if self.inbox else {"type": "websocket.disconnect"}


def read(messages: list[str], **settings) -> tuple[list[dict], list[EndReason], list[dict]]:
    """(events sent, stops requested, prompt updates acted on) after the client's messages."""
    sent, stops, updates = [], [], []

    async def update_prompt(live, message):
        updates.append(message)
        return len(updates), 3

    api = WebSocketApi()
    api.core = SimpleNamespace(  # type: ignore[assignment]
        settings=ServeSettings(preset="tiny", **settings),
        streams=SimpleNamespace(update_prompt=update_prompt),
    )  # fmt: skip
    live = SimpleNamespace(id="sess_t", request_stop=stops.append)

    async def send(message: dict, data: bytes | None = None) -> None:
        sent.append(message)

    asyncio.run(api._ws_read(Socket(messages), live, send))
    return sent, stops, updates


def prompt(text: str) -> str:
    return json.dumps({"type": "prompt", "prompt": text})


def test_a_message_over_the_size_limit_is_an_error_and_the_session_goes_on():
    big = prompt("x" * 2000)
    sent, stops, updates = read([big, prompt("a fox")], max_message_bytes=1024)
    assert sent[0]["type"] == "error" and sent[0]["code"] == "request_too_large"
    assert "limit is 1024" in sent[0]["message"]
    assert [u["prompt"] for u in updates] == ["a fox"]  # the big one was not acted on
    assert stops == [EndReason.DISCONNECTED]  # ended only by the client leaving


def test_the_eighth_mistake_ends_the_session_with_protocol_error():
    mistakes = ["{not json", '{"type": "dance"}', "[1, 2]", '"text"'] * 2
    assert len(mistakes) == MAX_PROTOCOL_ERRORS == 8
    sent, stops, _ = read(mistakes[:7])
    assert len(sent) == 7 and EndReason.PROTOCOL_ERROR not in stops
    sent, stops, _ = read(mistakes)
    assert [e["type"] for e in sent] == ["error"] * 8
    assert stops[0] == EndReason.PROTOCOL_ERROR


def test_messages_faster_than_the_rate_are_refused_and_count_as_mistakes():
    """At 1 message a second (bursts of 1), 8 prompts sent at once: the first is acted on, the
    other 7 are refused (quota_exceeded, retry after 1 s); one more mistake is the 8th."""
    sent, stops, updates = read([prompt(f"p{i}") for i in range(8)], max_message_rate=1)
    assert [u["prompt"] for u in updates] == ["p0"]
    refused = [e for e in sent if e["type"] == "error"]
    assert len(refused) == 7 and {e["code"] for e in refused} == {"quota_exceeded"}
    assert all(e.get("retry_after_s") == 1 for e in refused)
    assert EndReason.PROTOCOL_ERROR not in stops
    _, stops, _ = read([prompt(f"p{i}") for i in range(8)] + ["{bad"], max_message_rate=1)
    assert stops[0] == EndReason.PROTOCOL_ERROR
