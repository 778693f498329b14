"""The gateway deployment: Serve's ingress for HTTP (the OpenAI Videos and Models API,
WebSocket sessions, health, metrics) and gRPC (`histream.v1.HiStream`). It holds no model; each
route or RPC hands over to its transport's adapter, all over one `GatewayCore`.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime.
"""

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from protos.histream.v1 import api_pb2
from services.errors import InvalidArgument
from services.gateway.core import GatewayCore
from services.gateway.grpc import GrpcAdapter
from services.gateway.http import HttpAdapter, error_response
from services.gateway.websocket import WebSocketAdapter
from services.sessions import StageHandles
from services.settings import ServeSettings

api = FastAPI(title="HiStream Serve", version="1")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> Response:
    """FastAPI's own checks answer like every other bad request: 400, OpenAI's error body."""
    first = err.errors()[0] if err.errors() else {}
    param = str(first.get("loc", ["", ""])[-1]) or None
    return error_response(InvalidArgument(f"{param}: {first.get('msg', 'invalid')}", param))


@serve.ingress(api)
class Gateway:
    def __init__(self, settings: ServeSettings, structure, refine, decode) -> None:
        handles = StageHandles(structure=structure, refine=refine, decode=decode)
        self.core = GatewayCore(settings, handles)
        self.http = HttpAdapter(self.core)
        self.ws = WebSocketAdapter(self.core)
        self.grpc = GrpcAdapter(self.core)

    # -- HTTP -------------------------------------------------------------------------------------

    @api.post("/v1/videos")
    async def http_create_video(self, request: Request) -> Response:
        return await self.http.create_video(request)

    @api.get("/v1/videos")
    async def http_list_videos(self, request: Request) -> Response:
        return await self.http.list_videos(request)

    @api.get("/v1/videos/{video_id}")
    async def http_get_video(self, request: Request, video_id: str) -> Response:
        return await self.http.get_video(request, video_id)

    @api.delete("/v1/videos/{video_id}")
    async def http_delete_video(self, request: Request, video_id: str) -> Response:
        return await self.http.delete_video(request, video_id)

    @api.get("/v1/videos/{video_id}/content")
    async def http_video_content(self, request: Request, video_id: str) -> Response:
        return await self.http.video_content(request, video_id)

    @api.get("/v1/models")
    async def http_list_models(self, request: Request) -> Response:
        return await self.http.list_models(request)

    @api.get("/v1/models/{model_id}")
    async def http_get_model(self, request: Request, model_id: str) -> Response:
        return await self.http.get_model(request, model_id)

    @api.get("/healthz")
    async def http_healthz(self) -> dict:
        return self.core.health()

    @api.get("/readyz")
    async def http_readyz(self) -> Response:
        ready, body = await self.core.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def http_metrics(self) -> Response:
        return PlainTextResponse(self.core.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.websocket("/v1/sessions")
    async def ws_session(self, ws: WebSocket) -> None:
        await self.ws.serve(ws)

    # -- gRPC: histream.v1.HiStream ---------------------------------------------------------------

    async def CreateVideo(self, request: api_pb2.CreateVideoRequest, grpc_context=None):
        return await self.grpc.create_video(request, grpc_context)

    async def GetVideo(self, request: api_pb2.GetVideoRequest, grpc_context=None):
        return await self.grpc.get_video(request, grpc_context)

    async def ListVideos(self, request: api_pb2.ListVideosRequest, grpc_context=None):
        return await self.grpc.list_videos(request, grpc_context)

    async def DeleteVideo(self, request: api_pb2.DeleteVideoRequest, grpc_context=None):
        return await self.grpc.delete_video(request, grpc_context)

    async def StreamSession(self, request: api_pb2.StreamSessionRequest, grpc_context=None):
        async for event in self.grpc.stream_session(request, grpc_context):
            yield event

    async def UpdateSessionPrompt(
        self, request: api_pb2.UpdateSessionPromptRequest, grpc_context=None
    ):
        return await self.grpc.update_prompt(request, grpc_context)

    async def CloseSession(self, request: api_pb2.CloseSessionRequest, grpc_context=None):
        return await self.grpc.close_session(request, grpc_context)

    async def ListModels(self, request: api_pb2.ListModelsRequest, grpc_context=None):
        return await self.grpc.list_models(request, grpc_context)

    # -- for tests and benchmarks -----------------------------------------------------------------

    def active_sessions(self) -> dict[str, int]:
        return self.core.active_sessions()
