"""The gateway: the Serve ingress for HTTP (OpenAI Videos API, WebSocket sessions, health,
metrics) and gRPC (`histream.v1.HiStream`). It validates every request, runs video jobs and
streaming sessions through `SessionDriver`, and holds no model.
"""

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from ray import serve

from protos.histream.v1 import api_pb2
from services.api import (
    SessionStart,
    VideoCreate,
    check_prompt_field,
    parse,
    resolve_session,
    resolve_video,
)
from services.errors import InvalidArgument, NotFound, ServiceError
from services.jobs import JobRunner, RecordStore, VideoRecord
from services.metrics import Metrics
from services.pipeline import ChunkEvent, SessionDriver, SessionPlan, StageHandles, shape_for
from services.publish import Layout
from services.settings import ServeSettings
from services.storage import open_storage

log = logging.getLogger("histream.gateway")
api = FastAPI(title="HiStream Serve", version="1")


# -- streaming sessions (shared by WebSocket and gRPC) ---------------------------------------------


@dataclass
class LiveSession:
    """A streaming session this replica drives."""

    id: str
    driver: SessionDriver
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: bool = False  # the client went away: free everything, send nothing

    def close(self, disconnected: bool = False) -> None:
        self.disconnected = self.disconnected or disconnected
        self.closing.set()


@dataclass(frozen=True)
class Started:
    session: LiveSession
    width: int
    height: int
    fps: int
    num_chunks: int
    num_frames: int
    playlist_key: str


@dataclass(frozen=True)
class Ended:
    reason: str  # completed | closed


SessionEvent = Started | bytes | ChunkEvent | tuple | Ended  # bytes: init; tuple: prompt update


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


# -- event encodings (defined before the class: @serve.ingress serializes it at definition) ---


async def _until(
    chunks: AsyncIterator[ChunkEvent], stop: asyncio.Event
) -> AsyncIterator[ChunkEvent]:
    """Iterate `chunks` until they end or `stop` is set, whichever comes first; always closes
    `chunks` (which frees the session's stages) on the way out."""
    stopper = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield event
    finally:
        for task in (step, stopper):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await chunks.aclose()


def _started_json(event: Started) -> dict:
    return {
        "type": "session.started",
        "session_id": event.session.id,
        "width": event.width,
        "height": event.height,
        "fps": event.fps,
        "num_chunks": event.num_chunks,
        "num_frames": event.num_frames,
        "playlist_key": event.playlist_key,
    }


def _chunk_json(chunk: ChunkEvent) -> dict:
    return {
        "type": "chunk",
        "index": chunk.index,
        "first_frame": chunk.first_frame,
        "num_frames": chunk.num_frames,
        "prompt_version": chunk.prompt_version,
        "latents_sha256": chunk.latents_sha256,
        "bytes": len(chunk.segment),
    }


async def _ws_send(send: Callable, event: SessionEvent) -> None:
    """One session event as WebSocket messages: JSON, then the media bytes if it has any."""
    if isinstance(event, Started):
        await send(_started_json(event))
    elif isinstance(event, bytes):
        await send({"type": "init", "bytes": len(event)}, event)
    elif isinstance(event, tuple):
        version, start = event
        await send({"type": "prompt.applied", "prompt_version": version, "from_chunk": start})
    elif isinstance(event, ChunkEvent):
        await send(_chunk_json(event), event.segment)
    elif isinstance(event, Ended):
        await send({"type": "session.ended", "reason": event.reason})


def _session_event(event: SessionEvent) -> api_pb2.SessionEvent:
    if isinstance(event, Started):
        return api_pb2.SessionEvent(
            started=api_pb2.SessionStarted(
                session_id=event.session.id,
                width=event.width,
                height=event.height,
                fps=event.fps,
                num_chunks=event.num_chunks,
                num_frames=event.num_frames,
                playlist_key=event.playlist_key,
            )
        )
    if isinstance(event, bytes):
        return api_pb2.SessionEvent(init=api_pb2.InitSegment(data=event))
    if isinstance(event, tuple):
        return api_pb2.SessionEvent(
            prompt_updated=api_pb2.PromptUpdated(prompt_version=event[0], from_chunk=event[1])
        )
    if isinstance(event, ChunkEvent):
        return api_pb2.SessionEvent(
            chunk=api_pb2.ChunkSegment(
                index=event.index,
                first_frame=event.first_frame,
                num_frames=event.num_frames,
                data=event.segment,
                prompt_version=event.prompt_version,
                latents_sha256=event.latents_sha256,
            )
        )
    return api_pb2.SessionEvent(ended=api_pb2.SessionEnded(reason=event.reason))


def _video_message(record: VideoRecord) -> api_pb2.Video:
    return api_pb2.Video(
        id=record.id,
        object=record.object,
        model=record.model,
        status=record.status.value,
        progress=record.progress,
        created_at=record.created_at,
        completed_at=record.completed_at or 0,
        expires_at=record.expires_at or 0,
        error=api_pb2.VideoError(code=record.error.code, message=record.error.message)
        if record.error
        else None,
        seconds=record.seconds,
        size=record.size,
        prompt=record.prompt,
        seed=record.seed,
        mode=record.mode,
        num_frames=record.num_frames,
    )


# -- the deployment --------------------------------------------------------------------------------


@serve.ingress(api)
class Gateway:
    def __init__(self, settings: ServeSettings, structure, refine, decode) -> None:
        self.settings = settings
        self.preset = settings.get_preset()
        self.layout = Layout(settings.tenant)
        self.storage = open_storage(settings.storage)
        self.records = RecordStore(self.storage, self.layout)
        self.handles = StageHandles(structure=structure, refine=refine, decode=decode)
        self.metrics = Metrics()
        self.jobs = JobRunner(
            self.handles,
            self.records,
            self.preset,
            self.metrics,
            max_running=settings.max_running_jobs,
            queue_timeout_s=settings.queue_timeout_s,
            ttl_s=settings.video_ttl_s,
            fps=settings.fps,
        )
        self.sessions: dict[str, LiveSession] = {}

    # -- video jobs -----------------------------------------------------------------------------

    async def create_video(self, body: VideoCreate) -> VideoRecord:
        s = self.settings
        resolved = resolve_video(body, self.preset, s.served_model, s.fps, s.max_prompt_chars)
        return await self.jobs.submit(resolved)

    async def list_videos(self, limit: int, after: str | None, order: str) -> dict:
        if not 1 <= limit <= 100:
            raise InvalidArgument(f"limit={limit} must be in [1, 100]", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidArgument(f"order {order!r} must be 'asc' or 'desc'", param="order")
        records = sorted(await self.records.list(), key=lambda r: (r.created_at, r.id))
        if order == "desc":
            records.reverse()
        if after:
            ids = [r.id for r in records]
            if after not in ids:
                raise NotFound(f"no video with id {after!r} to list after", param="after")
            records = records[ids.index(after) + 1 :]
        page = records[:limit]
        return {
            "object": "list",
            "data": [r.public() for r in page],
            "has_more": len(records) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    async def delete_video(self, video_id: str) -> dict:
        await self.records.get(video_id)  # 404 when unknown
        await self.jobs.cancel(video_id)
        await self.records.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # -- streaming sessions ---------------------------------------------------------------------

    async def run_session(self, body: SessionStart, session_id: str) -> AsyncIterator[SessionEvent]:
        """Open a session, then yield its events until it completes or is closed."""
        s = self.settings
        resolved = resolve_session(body, self.preset, s.served_model, s.fps, s.max_prompt_chars)
        shape = shape_for(
            self.preset, resolved.mode, resolved.height, resolved.width, resolved.num_frames
        )
        plan = SessionPlan(
            object_id=session_id,
            kind="session",
            tenant=self.layout.tenant,
            shape=shape,
            seed=resolved.seed,
            prompt=resolved.prompt,
            fps=s.fps,
        )
        live = LiveSession(id=session_id, driver=SessionDriver(self.handles, plan))
        self.sessions[session_id] = live
        try:
            with self.metrics.track("session", live.driver):
                await live.driver.open(deadline_s=s.queue_timeout_s)
                yield Started(
                    session=live,
                    width=shape.width,
                    height=shape.height,
                    fps=s.fps,
                    num_chunks=shape.num_chunks,
                    num_frames=shape.num_frames,
                    playlist_key=self.layout.session_playlist_key(session_id),
                )
                yield live.driver.init_segment
                version = 0
                async for chunk in _until(live.driver.chunks(), live.closing):
                    if chunk.prompt_version != version:
                        version = chunk.prompt_version
                        yield (version, chunk.index)
                    self.metrics.observe_chunk(chunk)
                    yield chunk
                if live.disconnected:
                    return
                await live.driver.finish()
                yield Ended("closed" if live.closing.is_set() else "completed")
        finally:
            self.sessions.pop(session_id, None)
            await live.driver.close()

    def live(self, session_id: str) -> LiveSession:
        live = self.sessions.get(session_id)
        if live is None:
            raise NotFound(f"no running session with id {session_id!r}", param="session_id")
        return live

    async def update_prompt(self, session_id: str, prompt: str | None) -> tuple[int, int]:
        text = check_prompt_field(prompt, self.settings.max_prompt_chars)
        return await self.live(session_id).driver.update_prompt(text)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _http(self, request: Request, work: Callable[[], Awaitable]) -> Response:
        """Run an API route: service errors become OpenAI-style error bodies; count it."""
        try:
            result = await work()
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServiceError as err:
            response = JSONResponse(err.body(), status_code=err.http_status)
        route = getattr(request.scope.get("route"), "path", request.url.path)
        self.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        return response

    @api.post("/v1/videos")
    async def http_create_video(self, request: Request) -> Response:
        async def work() -> dict:
            kind = request.headers.get("content-type", "")
            if kind.startswith("multipart/form-data") or kind.startswith(
                "application/x-www-form-urlencoded"
            ):
                form = await request.form()
                if form.get("input_reference") is not None:
                    raise InvalidArgument(
                        "input_reference is not supported: text-to-video only",
                        param="input_reference",
                    )
                data = {k: v for k, v in form.items() if isinstance(v, str)}
            else:
                try:
                    data = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise InvalidArgument("the body must be JSON or multipart form data") from None
                if not isinstance(data, dict):
                    raise InvalidArgument("the JSON body must be an object")
            record = await self.create_video(parse(VideoCreate, data))
            return record.public()

        return await self._http(request, work)

    @api.get("/v1/videos")
    async def http_list_videos(
        self, request: Request, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> Response:
        return await self._http(request, lambda: self.list_videos(limit, after, order))

    @api.get("/v1/videos/{video_id}")
    async def http_get_video(self, request: Request, video_id: str) -> Response:
        async def work() -> dict:
            return (await self.records.get(video_id)).public()

        return await self._http(request, work)

    @api.delete("/v1/videos/{video_id}")
    async def http_delete_video(self, request: Request, video_id: str) -> Response:
        return await self._http(request, lambda: self.delete_video(video_id))

    @api.get("/v1/videos/{video_id}/content")
    async def http_video_content(
        self, request: Request, video_id: str, variant: str = "video"
    ) -> Response:
        async def work() -> Response:
            if variant != "video":
                raise InvalidArgument(
                    f"variant {variant!r} is not available; only 'video'", "variant"
                )
            record = await self.records.get(video_id)
            if record.status != "completed":
                raise NotFound(
                    f"video {video_id!r} is {record.status.value}; content exists once completed",
                    param="video_id",
                )
            url = self.records.content_url(video_id, self.settings.storage.presign_expiry_s)
            if url is not None:
                return RedirectResponse(url, status_code=307)
            return Response(await self.records.content(video_id), media_type="video/mp4")

        return await self._http(request, work)

    @api.get("/healthz")
    async def http_healthz(self) -> dict:
        return {"status": "ok", "model": self.settings.served_model, "preset": self.preset.name}

    @api.get("/metrics")
    async def http_metrics(self) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.websocket("/v1/sessions")
    async def ws_session(self, ws: WebSocket) -> None:
        """JSON control messages in; JSON events out, each media event followed by its bytes."""
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
        session_id = new_session_id()
        reader: asyncio.Task | None = None
        try:
            if not isinstance(start, dict) or start.get("type") != "start":
                raise InvalidArgument('the first message must be {"type": "start", ...}')
            events = self.run_session(parse(SessionStart, start), session_id)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Started):
                        reader = asyncio.create_task(self._ws_reader(ws, event.session, send))
                    await _ws_send(send, event)
            await ws.close()
        except ServiceError as err:
            with contextlib.suppress(Exception):
                await send({"type": "error", "code": err.code, "message": err.message})
                await ws.close(code=1008 if err.http_status == 400 else 1011)
        except (WebSocketDisconnect, RuntimeError):
            log.info("session %s: client disconnected", session_id)
        finally:
            if reader is not None:
                reader.cancel()

    async def _ws_reader(self, ws: WebSocket, live: LiveSession, send) -> None:
        """Prompt changes and close requests from the client; a disconnect ends the session."""

        async def prompt(text: object) -> None:
            try:
                version, start = await self.update_prompt(live.id, text)  # type: ignore[arg-type]
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
                    live.close()
                else:
                    error = InvalidArgument(f"unknown message type {kind!r}; use prompt or close")
                    await send({"type": "error", "code": error.code, "message": error.message})
        except (WebSocketDisconnect, RuntimeError, json.JSONDecodeError):
            live.close(disconnected=True)
            await live.driver.close()  # free the caches now; the writer side ends on its own
        finally:
            for task in updates:
                task.cancel()

    # -- gRPC (histream.v1.HiStream) ---------------------------------------------------------------

    async def _grpc(self, grpc_context, work: Callable[[], Awaitable]):
        try:
            return await work()
        except ServiceError as err:
            grpc_context.set_code(err.grpc_status)
            grpc_context.set_details(err.message)
            raise

    async def CreateVideo(
        self, request: api_pb2.CreateVideoRequest, grpc_context=None
    ) -> api_pb2.Video:
        body = VideoCreate(
            prompt=request.prompt,
            model=request.model or None,
            seconds=request.seconds or None,
            size=request.size or None,
            seed=request.seed if request.HasField("seed") else None,
            mode=request.mode or None,
        )
        return await self._grpc(grpc_context, lambda: self._video_pb(self.create_video(body)))

    async def GetVideo(self, request: api_pb2.GetVideoRequest, grpc_context=None) -> api_pb2.Video:
        return await self._grpc(grpc_context, lambda: self._video_pb(self.records.get(request.id)))

    async def ListVideos(
        self, request: api_pb2.ListVideosRequest, grpc_context=None
    ) -> api_pb2.ListVideosResponse:
        async def work() -> api_pb2.ListVideosResponse:
            page = await self.list_videos(
                request.limit or 20, request.after or None, request.order or "desc"
            )
            return api_pb2.ListVideosResponse(
                data=[_video_message(VideoRecord(**d, tenant="")) for d in page["data"]],
                has_more=page["has_more"],
                first_id=page["first_id"] or "",
                last_id=page["last_id"] or "",
            )

        return await self._grpc(grpc_context, work)

    async def DeleteVideo(
        self, request: api_pb2.DeleteVideoRequest, grpc_context=None
    ) -> api_pb2.DeleteVideoResponse:
        async def work() -> api_pb2.DeleteVideoResponse:
            result = await self.delete_video(request.id)
            return api_pb2.DeleteVideoResponse(**result)

        return await self._grpc(grpc_context, work)

    async def StreamSession(self, request: api_pb2.StreamSessionRequest, grpc_context=None):
        body = SessionStart(
            prompt=request.prompt,
            model=request.model or None,
            size=request.size or None,
            seed=request.seed if request.HasField("seed") else None,
            mode=request.mode or None,
            num_frames=request.num_frames or None,
        )
        try:
            async with contextlib.aclosing(self.run_session(body, new_session_id())) as events:
                async for event in events:
                    yield _session_event(event)
        except ServiceError as err:
            if grpc_context is not None:
                grpc_context.set_code(err.grpc_status)
                grpc_context.set_details(err.message)
            raise

    async def UpdateSessionPrompt(
        self, request: api_pb2.UpdateSessionPromptRequest, grpc_context=None
    ) -> api_pb2.UpdateSessionPromptResponse:
        async def work() -> api_pb2.UpdateSessionPromptResponse:
            version, start = await self.update_prompt(request.session_id, request.prompt)
            return api_pb2.UpdateSessionPromptResponse(
                session_id=request.session_id, prompt_version=version, from_chunk=start
            )

        return await self._grpc(grpc_context, work)

    async def CloseSession(
        self, request: api_pb2.CloseSessionRequest, grpc_context=None
    ) -> api_pb2.CloseSessionResponse:
        async def work() -> api_pb2.CloseSessionResponse:
            self.live(request.session_id).close()
            return api_pb2.CloseSessionResponse(session_id=request.session_id, closed=True)

        return await self._grpc(grpc_context, work)

    async def _video_pb(self, record: Awaitable[VideoRecord]) -> api_pb2.Video:
        return _video_message(await record)

    # -- for tests and benchmarks ----------------------------------------------------------------

    def active_sessions(self) -> dict[str, int]:
        return {kind: self.metrics.active(kind) for kind in ("video", "session")}
