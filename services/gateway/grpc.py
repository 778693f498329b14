"""The gRPC adapter: `histream.v1.HiStream` (protos/histream/v1/api.proto) over the gateway
core. Service errors set the call's status code and details, then propagate."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from protos.histream.v1 import api_pb2
from services.errors import Internal, InvalidArgument, ServiceError
from services.gateway.core import GatewayCore
from services.gateway.requests import SessionStart, VideoCreate
from services.jobs import VideoRecord
from services.protocol.servicer import UndecodableRequest

T = TypeVar("T")
log = logging.getLogger("histream.gateway")


def video_message(record: VideoRecord) -> api_pb2.Video:
    """The OpenAI video object as `histream.v1.Video` (unset times are 0, no error unset)."""
    fields = {k: v for k, v in record.public().items() if v is not None}
    return json_format.ParseDict(fields, api_pb2.Video())


def fields_of(request) -> dict:
    """A request's fields as the validation layer takes them from every transport; an unset
    optional field is absent (proto3's empty strings and zeros read as absent there too)."""
    return {
        f.name: getattr(request, f.name)
        for f in request.DESCRIPTOR.fields
        if not f.has_presence or request.HasField(f.name)
    }


def decoded(request: object) -> None:
    """Refuse a request the proxy could not parse (see servicer.py)."""
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument(f"the request is not a valid {request.type_name}: {request.reason}")


@contextlib.contextmanager
def status_of_errors(context, during: str, request: object = None):
    """Set the call's status from a service error before it propagates; any other failure is
    INTERNAL with an error id (its details stay in the server log)."""
    try:
        decoded(request)
        yield
    except Exception as err:
        failure = err if isinstance(err, ServiceError) else Internal.logged(log, err, during)
        if context is not None:
            context.set_code(failure.grpc_status)
            context.set_details(failure.message)
            retry = getattr(failure, "retry_after_s", None)
            if retry is not None:
                context.set_trailing_metadata((("retry-after", str(retry)),))
        if failure is err:
            raise
        raise failure from None


def authorization_of(grpc_context, authorization: str | None) -> str | None:
    """The call's `authorization` metadata: Serve's proxy hands the call's context; the local
    front (services/local/grpc_front.py) passes the value itself."""
    if authorization is None and grpc_context is not None:
        metadata = dict(grpc_context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
    return authorization


def unary(method: Callable[[Any, Any, str], Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An RPC of `histream.v1.HiStream` called with the caller's tenant: Serve hands it the
    call's `grpc_context`, from whose metadata the caller is authenticated (before any work)
    and on which errors set the status. Not functools.wraps: Serve reads the signature for
    `grpc_context`."""

    async def call(self, request, grpc_context=None, authorization: str | None = None) -> T:
        with status_of_errors(grpc_context, method.__name__, request):
            auth = authorization_of(grpc_context, authorization)
            return await method(self, request, self.core.caller(auth))

    _named_as(call, method)
    return call


def streaming(method: Callable[[Any, Any, str], Awaitable[Any]]) -> Callable[..., AsyncIterator]:
    """A server-streaming RPC of `histream.v1.HiStream`: the caller is authenticated as for
    `unary`, `method` opens (or resumes) the session, and its events are streamed."""

    async def call(
        self, request, grpc_context=None, authorization: str | None = None
    ) -> AsyncIterator[api_pb2.SessionEvent]:
        with status_of_errors(grpc_context, method.__name__, request):
            tenant = self.core.caller(authorization_of(grpc_context, authorization))
            live = await method(self, request, tenant)
            async with contextlib.aclosing(self.core.streams.events(live)) as events:
                async for event in events:
                    yield event.proto()

    _named_as(call, method)
    return call


def _named_as(call: Callable, method: Callable) -> None:
    """Not functools.wraps: Serve reads the call's own signature for `grpc_context`."""
    call.__name__, call.__qualname__, call.__doc__ = (
        method.__name__,
        method.__qualname__,
        method.__doc__,
    )


class GrpcApi:
    """`histream.v1.HiStream` over the gateway core: the gateway deployment inherits these
    methods, named as the RPCs Serve's gRPC proxy (or the local front) calls."""

    core: GatewayCore

    @unary
    async def CreateVideo(self, request: api_pb2.CreateVideoRequest, tenant: str) -> api_pb2.Video:
        body = VideoCreate.parse(fields_of(request))
        return video_message(await self.core.videos.create(body, tenant))

    @unary
    async def GetVideo(self, request: api_pb2.GetVideoRequest, tenant: str) -> api_pb2.Video:
        return video_message(await self.core.videos.get(request.id, tenant))

    @unary
    async def ListVideos(
        self, request: api_pb2.ListVideosRequest, tenant: str
    ) -> api_pb2.ListVideosResponse:
        page = await self.core.videos.list(
            request.limit or 20, request.after or None, request.order or "desc", tenant
        )
        return api_pb2.ListVideosResponse(
            data=[video_message(VideoRecord(**d, tenant="")) for d in page["data"]],
            has_more=page["has_more"],
            first_id=page["first_id"] or "",
            last_id=page["last_id"] or "",
        )

    @unary
    async def DeleteVideo(
        self, request: api_pb2.DeleteVideoRequest, tenant: str
    ) -> api_pb2.DeleteVideoResponse:
        return api_pb2.DeleteVideoResponse(**await self.core.videos.delete(request.id, tenant))

    @streaming
    async def StreamSession(self, request: api_pb2.StreamSessionRequest, tenant: str):
        return self.core.streams.open(SessionStart.parse(fields_of(request)), tenant)

    @streaming
    async def ResumeSession(self, request: api_pb2.ResumeSessionRequest, tenant: str):
        return await self.core.streams.resume(
            request.session_id, request.session_token, request.last_chunk, tenant
        )

    @unary
    async def UpdateSessionPrompt(
        self, request: api_pb2.UpdateSessionPromptRequest, tenant: str
    ) -> api_pb2.UpdateSessionPromptResponse:
        change = {
            "prompt": request.prompt,
            "transition_chunks": request.transition_chunks or None,  # 0: unset
            "interpolation": request.interpolation or None,
            "recache": request.recache,
        }
        version, start = await self.core.streams.update_prompt_by_id(
            request.session_id, request.session_token, change, tenant
        )
        return api_pb2.UpdateSessionPromptResponse(
            session_id=request.session_id, prompt_version=version, from_chunk=start
        )

    @unary
    async def CloseSession(
        self, request: api_pb2.CloseSessionRequest, tenant: str
    ) -> api_pb2.CloseSessionResponse:
        await self.core.streams.close_by_id(request.session_id, request.session_token, tenant)
        return api_pb2.CloseSessionResponse(session_id=request.session_id, closed=True)

    @unary
    async def ListModels(
        self, request: api_pb2.ListModelsRequest, tenant: str
    ) -> api_pb2.ListModelsResponse:
        names = ("id", "object", "created", "owned_by")
        models = [api_pb2.Model(**{n: m[n] for n in names}) for m in self.core.models()]
        return api_pb2.ListModelsResponse(data=models)
