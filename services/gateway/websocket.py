"""The WebSocket adapter: a streaming session over `/v1/sessions`.

The client's first message starts (or resumes) the session, its API key in the `Authorization`
header or, for browsers, in the message's `api_key`; then it may send prompt changes and a
close.
Each session event goes out as its JSON message, followed by its media as a binary message
when it has one. A malformed client message gets an `error` event naming the problem and the
session goes on; after `MAX_PROTOCOL_ERRORS` of them it ends (`session.ended`, reason
`protocol_error`). A disconnect ends the session and frees its caches at once. The route is a
method of `WebSocketApi`, which the gateway deployment inherits.

No `from __future__ import annotations` here: FastAPI reads the route's annotations at runtime.
"""

import asyncio
import contextlib
import logging

from fastapi import WebSocket, WebSocketDisconnect

from services.errors import Internal, InvalidArgument, QuotaExceeded, ServiceError, TooLarge
from services.gateway.bodies import parse_object
from services.gateway.core import GatewayCore
from services.gateway.http import api
from services.gateway.quotas import TokenBucket
from services.gateway.requests import SessionStart, text
from services.protocol import EndReason
from services.sessions import LiveSession

log = logging.getLogger("histream.gateway")
MAX_PROTOCOL_ERRORS = 8  # malformed messages a session tolerates before it is ended


class Disconnected(Exception):
    """The client went away."""


class WebSocketApi:
    core: GatewayCore

    @api.websocket("/v1/sessions")
    async def session_socket(self, ws: WebSocket) -> None:
        await ws.accept()
        send_lock = asyncio.Lock()

        async def send(message: dict, data: bytes | None = None) -> None:
            async with send_lock:
                await ws.send_json(message)
                if data is not None:
                    await ws.send_bytes(data)

        live: LiveSession | None = None
        reader: asyncio.Task | None = None
        try:
            start = await self._ws_message(ws)
            tenant = self._ws_tenant(ws, start)
            if start.get("type") == "resume":
                live = await self.core.streams.resume(*resume_fields(start), tenant)
            elif start.get("type") == "start":
                live = self.core.streams.open(SessionStart.parse(start), tenant)
            else:
                raise InvalidArgument(
                    'the first message must be {"type": "start", ...} or {"type": "resume", ...}',
                    "type",
                )
            # read from the start: a client may close, or go away, while its session waits
            reader = asyncio.create_task(self._ws_read(ws, live, send))
            events = self.core.streams.events(live)
            async with contextlib.aclosing(events):
                async for event in events:
                    await send(event.message(), event.payload)
            await ws.close()
        except ServiceError as err:
            await self._ws_fail(ws, send, err)
        except (Disconnected, WebSocketDisconnect, RuntimeError):  # RuntimeError: sent on a
            # socket starlette already knows is closed
            log.info("session %s: client disconnected", live.id if live else "(not started)")
        except Exception as err:  # a bug or a stage's unexpected failure: say so, then close
            sid = live.id if live else "(not started)"
            await self._ws_fail(ws, send, Internal.logged(log, err, f"session {sid}"))
        finally:
            if reader is not None:
                reader.cancel()

    @staticmethod
    async def _ws_fail(ws: WebSocket, send, err: ServiceError) -> None:
        """The `error` event, then a close: 1008 for the client's mistakes, 1011 for ours."""
        with contextlib.suppress(Exception):
            await send(error_event(err))
            await ws.close(code=1008 if err.http_status < 500 else 1011)

    def _ws_tenant(self, ws: WebSocket, first: dict) -> str:
        """The caller's tenant: from the `Authorization` header, or (browsers cannot set
        headers on a WebSocket) the first message's `api_key`, which is taken out of it."""
        key = first.pop("api_key", None)
        authorization = ws.headers.get("authorization")
        if authorization is None and key is not None:
            if not isinstance(key, str):
                raise InvalidArgument("api_key must be a string", "api_key")
            authorization = f"Bearer {key}"
        return self.core.caller(authorization)

    async def _ws_message(self, ws: WebSocket) -> dict:
        """The client's next message as a JSON object; a malformed one raises InvalidArgument
        (or TooLarge), a disconnect `Disconnected`."""
        frame = await ws.receive()
        if frame["type"] == "websocket.disconnect":
            raise Disconnected
        raw = frame.get("text")
        if raw is None:
            raise InvalidArgument("binary messages are not accepted; send JSON text messages")
        limit = self.core.settings.max_message_bytes
        if len(raw) > limit:
            raise TooLarge(f"a message of {len(raw)} characters; the limit is {limit}")
        return parse_object(raw, "the message")

    async def _ws_read(self, ws: WebSocket, live: LiveSession, send) -> None:
        """Prompt changes and close requests from the client; a disconnect ends the session."""

        async def prompt(message: dict) -> None:
            try:
                version, start = await self.core.streams.update_prompt(live, message)
                await send(
                    {"type": "prompt.accepted", "prompt_version": version, "from_chunk": start}
                )
            except ServiceError as err:
                await send(error_event(err))

        updates: set[asyncio.Task] = set()
        errors = 0
        rate = self.core.settings.max_message_rate
        bucket = TokenBucket(rate, max(1.0, rate))
        try:
            while True:
                try:
                    message = await self._ws_message(ws)
                    if bucket.take():
                        raise QuotaExceeded(
                            f"messages faster than {rate:g} a second (max_message_rate); this "
                            "one was not acted on",
                            retry_after_s=1,
                        )
                    kind = message.get("type")
                    if kind == "prompt":
                        task = asyncio.create_task(prompt(message))
                        updates.add(task)
                        task.add_done_callback(updates.discard)
                    elif kind == "close":
                        live.request_stop(EndReason.CLOSED)
                    else:
                        raise InvalidArgument(
                            f"unknown message type {kind!r}; use prompt or close", "type"
                        )
                except (InvalidArgument, TooLarge, QuotaExceeded) as err:
                    errors += 1
                    await send(error_event(err))
                    if errors >= MAX_PROTOCOL_ERRORS:
                        live.request_stop(EndReason.PROTOCOL_ERROR)
        except (Disconnected, WebSocketDisconnect, RuntimeError):
            live.request_stop(EndReason.DISCONNECTED)  # suspended at once, resumable by id
        finally:
            for task in updates:
                task.cancel()


def resume_fields(message: dict) -> tuple[str, str, int]:
    """(session_id, session_token, last_chunk) of a resume message."""
    session_id = text(message, "session_id")
    if session_id is None:
        raise InvalidArgument("session_id is required to resume a session", "session_id")
    last_chunk = message.get("last_chunk", -1)
    if isinstance(last_chunk, bool) or not isinstance(last_chunk, int):
        raise InvalidArgument("last_chunk must be an integer (-1: none received)", "last_chunk")
    return session_id, text(message, "session_token") or "", last_chunk


def error_event(err: ServiceError) -> dict:
    event = {"type": "error", "code": err.code, "message": err.message, "param": err.param}
    retry = getattr(err, "retry_after_s", None)
    return event if retry is None else {**event, "retry_after_s": retry}
