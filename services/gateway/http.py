"""The HTTP API: the OpenAI Videos and Models API, health and metrics over the gateway core.

Bodies in, the OpenAI JSON shapes out; service errors become OpenAI error bodies with their
HTTP status, anything unexpected a 500 body with an error id, and every request is counted by
route, method and status. The routes are methods of `HttpApi`, which the gateway deployment
inherits (Serve binds them to the replica).

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime.
"""

import functools
import logging
import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from services.errors import Internal, InvalidArgument, ServiceError, Unauthenticated
from services.gateway.bodies import decode_utf8, parse_object, read_body, read_fields, read_upload
from services.gateway.core import GatewayCore
from services.gateway.requests import VideoCreate, text, whole

log = logging.getLogger("histream.gateway")
api = FastAPI(title="HiStream Serve", version="1")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> Response:
    """FastAPI's own checks answer like every other bad request: 400, OpenAI's error body."""
    first = err.errors()[0] if err.errors() else {}
    param = str(first.get("loc", ["", ""])[-1]) or None
    return error_response(InvalidArgument(f"{param}: {first.get('msg', 'invalid')}", param))


def answered(method: Callable[..., Awaitable]) -> Callable[..., Awaitable[Response]]:
    """A route of the API: its caller is authenticated first (the tenant goes to
    `request.state.tenant`; no work on a missing or bad key), then its result (a dict, or a
    Response) or error becomes the HTTP answer."""

    @functools.wraps(method)  # FastAPI reads the route's parameters through __wrapped__
    async def route(self, request: Request, *args, **kwargs) -> Response:
        try:
            authorization = request.headers.get("authorization")
            request.state.tenant = self.core.caller(authorization)
            result = await method(self, request, *args, **kwargs)
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServiceError as err:
            response = error_response(err)
        except Exception as err:
            during = f"{request.method} {request.url.path}"
            response = error_response(Internal.logged(log, err, during))
        path = getattr(request.scope.get("route"), "path", request.url.path)
        self.core.metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        return response

    return route


def paging(request: Request) -> tuple[int, str | None]:
    """A list route's `limit` (default 20) and `after` query parameters."""
    query = dict(request.query_params)
    limit = whole(query, "limit")
    return 20 if limit is None else limit, text(query, "after")


class HttpApi:
    core: GatewayCore

    @api.post("/v1/videos")
    @answered
    async def create_video(self, request: Request) -> dict:
        data = await read_fields(request, self.core.settings.max_request_bytes)
        body = VideoCreate.parse(data)
        return (await self.core.videos.create(body, request.state.tenant)).public()

    @api.get("/v1/videos")
    @answered
    async def list_videos(self, request: Request) -> dict:
        query = dict(request.query_params)
        limit = whole(query, "limit")
        after, order = text(query, "after"), text(query, "order")
        tenant = request.state.tenant
        return await self.core.videos.list(
            20 if limit is None else limit, after, order or "desc", tenant
        )

    @api.get("/v1/videos/{video_id}")
    @answered
    async def get_video(self, request: Request, video_id: str) -> dict:
        return (await self.core.videos.get(video_id, request.state.tenant)).public()

    @api.delete("/v1/videos/{video_id}")
    @answered
    async def delete_video(self, request: Request, video_id: str) -> dict:
        return await self.core.videos.delete(video_id, request.state.tenant)

    @api.get("/v1/videos/{video_id}/content")
    @answered
    async def video_content(self, request: Request, video_id: str) -> Response:
        variant = text(dict(request.query_params), "variant") or "video"
        content = await self.core.videos.content(video_id, variant, request.state.tenant)
        if content.url is not None:
            return RedirectResponse(content.url, status_code=307)
        assert content.data is not None
        return ranged(content.data, request.headers.get("range"))

    # -- files and batches (the OpenAI Files and Batch API shapes) ------------------------------

    @api.post("/v1/files")
    @answered
    async def upload_file(self, request: Request) -> dict:
        fields, filename, data = await read_upload(request, self.core.settings.max_file_bytes)
        purpose = fields.get("purpose", "")
        return await self.core.batches.upload(request.state.tenant, filename, purpose, data)

    @api.get("/v1/files")
    @answered
    async def list_files(self, request: Request) -> dict:
        return await self.core.batches.list_files(request.state.tenant, *paging(request))

    @api.get("/v1/files/{file_id}")
    @answered
    async def get_file(self, request: Request, file_id: str) -> dict:
        return await self.core.batches.file(request.state.tenant, file_id)

    @api.get("/v1/files/{file_id}/content")
    @answered
    async def file_content(self, request: Request, file_id: str) -> Response:
        data = await self.core.batches.file_content(request.state.tenant, file_id)
        return Response(data, media_type="application/jsonl")

    @api.delete("/v1/files/{file_id}")
    @answered
    async def delete_file(self, request: Request, file_id: str) -> dict:
        return await self.core.batches.delete_file(request.state.tenant, file_id)

    @api.post("/v1/batches")
    @answered
    async def create_batch(self, request: Request) -> dict:
        raw = await read_body(request, self.core.settings.max_request_bytes)
        body = parse_object(decode_utf8(raw, "the body"))
        return await self.core.batches.create(request.state.tenant, body)

    @api.get("/v1/batches")
    @answered
    async def list_batches(self, request: Request) -> dict:
        return await self.core.batches.list(request.state.tenant, *paging(request))

    @api.get("/v1/batches/{batch_id}")
    @answered
    async def get_batch(self, request: Request, batch_id: str) -> dict:
        return await self.core.batches.get(request.state.tenant, batch_id)

    @api.post("/v1/batches/{batch_id}/cancel")
    @answered
    async def cancel_batch(self, request: Request, batch_id: str) -> dict:
        return await self.core.batches.cancel(request.state.tenant, batch_id)

    @api.get("/v1/usage")
    @answered
    async def usage(self, request: Request) -> dict:
        """The caller's tenant: its quotas and its use of each."""
        return await self.core.quotas.usage(request.state.tenant)

    @api.get("/v1/models")
    @answered
    async def list_models(self, request: Request) -> dict:
        return {"object": "list", "data": self.core.models()}

    @api.get("/v1/models/{model_id}")
    @answered
    async def get_model(self, request: Request, model_id: str) -> dict:
        return self.core.model(model_id)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return self.core.health()

    @api.get("/readyz")
    async def readyz(self) -> Response:
        ready, body = await self.core.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        await self.core.scrape_stages()
        return PlainTextResponse(self.core.metrics.render(), media_type="text/plain; version=0.0.4")


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
    if isinstance(err, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.http_status, headers=headers)
