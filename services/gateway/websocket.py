"""The WebSocket adapter: a streaming session over `/v1/sessions`.

The client's first message starts the session; then it may send prompt changes and a close.
Each session event goes out as its JSON message, followed by its media as a binary message
when it has one. A disconnect ends the session and frees its caches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import WebSocket, WebSocketDisconnect

from services.errors import InvalidArgument, ServiceError
from services.gateway.core import GatewayCore
from services.gateway.requests import SessionStart, parse
from services.protocol import EndReason, SessionStarted
from services.sessions import LiveSession

log = logging.getLogger("histream.gateway")


class WebSocketAdapter:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()
        send_lock = asyncio.Lock()

        async def send(message: dict, data: bytes | None = None) -> None:
            async with send_lock:
                await ws.send_json(message)
                if data is not None:
                    await ws.send_bytes(data)

        try:
            start = await ws.receive_json()
        except (WebSocketDisconnect, json.JSONDecodeError, KeyError):
            with contextlib.suppress(Exception):
                await ws.close(code=1003)
            return
        live: LiveSession | None = None
        reader: asyncio.Task | None = None
        try:
            if not isinstance(start, dict) or start.get("type") != "start":
                raise InvalidArgument('the first message must be {"type": "start", ...}')
            live = self.core.open_session(parse(SessionStart, start))
            events = self.core.session_events(live)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, SessionStarted):
                        reader = asyncio.create_task(self._read(ws, live, send))
                    await send(event.message(), event.payload)
            await ws.close()
        except ServiceError as err:
            with contextlib.suppress(Exception):
                await send({"type": "error", "code": err.code, "message": err.message})
                await ws.close(code=1008 if err.http_status == 400 else 1011)
        except (WebSocketDisconnect, RuntimeError):
            log.info("session %s: client disconnected", live.id if live else "(not started)")
        finally:
            if reader is not None:
                reader.cancel()

    async def _read(self, ws: WebSocket, live: LiveSession, send) -> None:
        """Prompt changes and close requests from the client; a disconnect ends the session."""

        async def prompt(text: object) -> None:
            try:
                version, start = await self.core.update_prompt(live.id, text)
                await send(
                    {"type": "prompt.accepted", "prompt_version": version, "from_chunk": start}
                )
            except ServiceError as err:
                await send({"type": "error", "code": err.code, "message": err.message})

        updates: set[asyncio.Task] = set()
        try:
            while True:
                message = await ws.receive_json()
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "prompt":
                    task = asyncio.create_task(prompt(message.get("prompt")))
                    updates.add(task)
                    task.add_done_callback(updates.discard)
                elif kind == "close":
                    live.request_stop(EndReason.CLOSED)
                else:
                    error = InvalidArgument(f"unknown message type {kind!r}; use prompt or close")
                    await send({"type": "error", "code": error.code, "message": error.message})
        except (WebSocketDisconnect, RuntimeError, json.JSONDecodeError):
            live.request_stop(EndReason.DISCONNECTED)
            await live.driver.close(EndReason.DISCONNECTED)  # free the caches now
        finally:
            for task in updates:
                task.cancel()
