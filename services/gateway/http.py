"""The HTTP adapter: the OpenAI Videos and Models API over the gateway core. Bodies in, the
OpenAI JSON shapes out; service errors become OpenAI error bodies with their HTTP status, and
every request is counted by route, method and status."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from services.errors import InvalidArgument, ServiceError
from services.gateway.core import GatewayCore
from services.gateway.requests import VideoCreate, parse

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class HttpAdapter:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def respond(self, request: Request, work: Callable[[], Awaitable]) -> Response:
        """Run a route's work: a dict becomes JSON, a service error its OpenAI error body."""
        try:
            result = await work()
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServiceError as err:
            response = JSONResponse(err.body(), status_code=err.http_status)
        route = getattr(request.scope.get("route"), "path", request.url.path)
        self.core.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        return response

    async def create_video(self, request: Request) -> Response:
        async def work() -> dict:
            data = await _body(request)
            record = await self.core.create_video(parse(VideoCreate, data))
            return record.public()

        return await self.respond(request, work)

    async def list_videos(self, request: Request, limit: int, after: str | None, order: str):
        return await self.respond(request, lambda: self.core.list_videos(limit, after, order))

    async def get_video(self, request: Request, video_id: str) -> Response:
        async def work() -> dict:
            return (await self.core.get_video(video_id)).public()

        return await self.respond(request, work)

    async def delete_video(self, request: Request, video_id: str) -> Response:
        return await self.respond(request, lambda: self.core.delete_video(video_id))

    async def video_content(self, request: Request, video_id: str, variant: str) -> Response:
        async def work() -> Response:
            content = await self.core.video_content(video_id, variant)
            if content.url is not None:
                return RedirectResponse(content.url, status_code=307)
            return Response(content.data, media_type="video/mp4")

        return await self.respond(request, work)

    async def list_models(self, request: Request) -> Response:
        async def work() -> dict:
            return {"object": "list", "data": self.core.models()}

        return await self.respond(request, work)

    async def get_model(self, request: Request, model_id: str) -> Response:
        async def work() -> dict:
            return self.core.model(model_id)

        return await self.respond(request, work)


async def _body(request: Request) -> dict:
    """A JSON object, or the text fields of a form (what the openai client sends)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(FORM_TYPES):
        form = await request.form()
        if form.get("input_reference") is not None:
            raise InvalidArgument(
                "input_reference is not supported: text-to-video only", param="input_reference"
            )
        return {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("the body must be JSON or multipart form data") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the JSON body must be an object")
    return data
