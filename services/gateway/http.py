"""The HTTP adapter: the OpenAI Videos and Models API over the gateway core. Bodies in, the
OpenAI JSON shapes out; service errors become OpenAI error bodies with their HTTP status, and
every request is counted by route, method and status."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from services.errors import Internal, ServiceError
from services.gateway.bodies import read_fields
from services.gateway.core import GatewayCore
from services.gateway.requests import VideoCreate, text, whole

log = logging.getLogger("histream.gateway")


class HttpAdapter:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def respond(self, request: Request, work: Callable[[], Awaitable]) -> Response:
        """Run a route's work: a dict becomes JSON, a service error its OpenAI error body, any
        other failure a 500 body with an error id (the details go to the server log only)."""
        try:
            result = await work()
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServiceError as err:
            response = error_response(err)
        except Exception as err:
            during = f"{request.method} {request.url.path}"
            response = error_response(Internal.logged(log, err, during))
        route = getattr(request.scope.get("route"), "path", request.url.path)
        self.core.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        return response

    async def create_video(self, request: Request) -> Response:
        async def work() -> dict:
            data = await read_fields(request, self.core.settings.max_request_bytes)
            record = await self.core.create_video(VideoCreate.parse(data))
            return record.public()

        return await self.respond(request, work)

    async def list_videos(self, request: Request) -> Response:
        async def work() -> dict:
            query = dict(request.query_params)
            limit = whole(query, "limit")
            after, order = text(query, "after"), text(query, "order")
            return await self.core.list_videos(
                20 if limit is None else limit, after, order or "desc"
            )

        return await self.respond(request, work)

    async def get_video(self, request: Request, video_id: str) -> Response:
        async def work() -> dict:
            return (await self.core.get_video(video_id)).public()

        return await self.respond(request, work)

    async def delete_video(self, request: Request, video_id: str) -> Response:
        return await self.respond(request, lambda: self.core.delete_video(video_id))

    async def video_content(self, request: Request, video_id: str) -> Response:
        async def work() -> Response:
            variant = text(dict(request.query_params), "variant") or "video"
            content = await self.core.video_content(video_id, variant)
            if content.url is not None:
                return RedirectResponse(content.url, status_code=307)
            assert content.data is not None
            return ranged(content.data, request.headers.get("range"))

        return await self.respond(request, work)

    async def list_models(self, request: Request) -> Response:
        async def work() -> dict:
            return {"object": "list", "data": self.core.models()}

        return await self.respond(request, work)

    async def get_model(self, request: Request, model_id: str) -> Response:
        async def work() -> dict:
            return self.core.model(model_id)

        return await self.respond(request, work)


_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)


def ranged(data: bytes, header: str | None) -> Response:
    """The MP4, whole (200) or the one byte range asked for (206; RFC 9110 section 14), so
    players can seek and downloads resume. A range past the end answers 416."""
    size = len(data)
    whole = {"Accept-Ranges": "bytes"}
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.groups() == ("", ""):  # absent, or a form we do not serve
        return Response(data, media_type="video/mp4", headers=whole)
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
    else:  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    if start >= size or start > end:
        headers = {**whole, "Content-Range": f"bytes */{size}"}
        return Response(status_code=416, headers=headers)
    headers = {**whole, "Content-Range": f"bytes {start}-{end}/{size}"}
    return Response(data[start : end + 1], 206, media_type="video/mp4", headers=headers)


def error_response(err: ServiceError) -> JSONResponse:
    retry = getattr(err, "retry_after_s", None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse(err.body(), status_code=err.http_status, headers=headers)
