"""The gRPC adapter: `histream.v1.HiStream` (protos/histream/v1/api.proto) over the gateway
core. Service errors set the call's status code and details, then propagate."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

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


class GrpcAdapter:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def unary(self, request: object, context, work: Callable[[], Awaitable[T]]) -> T:
        with status_of_errors(context, "a gRPC call", request):
            return await work()

    async def create_video(self, request: api_pb2.CreateVideoRequest, context) -> api_pb2.Video:
        async def work() -> api_pb2.Video:
            body = VideoCreate.parse(fields_of(request))
            return video_message(await self.core.create_video(body))

        return await self.unary(request, context, work)

    async def get_video(self, request: api_pb2.GetVideoRequest, context) -> api_pb2.Video:
        async def work() -> api_pb2.Video:
            return video_message(await self.core.get_video(request.id))

        return await self.unary(request, context, work)

    async def list_videos(
        self, request: api_pb2.ListVideosRequest, context
    ) -> api_pb2.ListVideosResponse:
        async def work() -> api_pb2.ListVideosResponse:
            page = await self.core.list_videos(
                request.limit or 20, request.after or None, request.order or "desc"
            )
            return api_pb2.ListVideosResponse(
                data=[video_message(VideoRecord(**d, tenant="")) for d in page["data"]],
                has_more=page["has_more"],
                first_id=page["first_id"] or "",
                last_id=page["last_id"] or "",
            )

        return await self.unary(request, context, work)

    async def delete_video(
        self, request: api_pb2.DeleteVideoRequest, context
    ) -> api_pb2.DeleteVideoResponse:
        async def work() -> api_pb2.DeleteVideoResponse:
            return api_pb2.DeleteVideoResponse(**await self.core.delete_video(request.id))

        return await self.unary(request, context, work)

    async def stream_session(
        self, request: api_pb2.StreamSessionRequest, context
    ) -> AsyncIterator[api_pb2.SessionEvent]:
        with status_of_errors(context, "a gRPC session", request):
            live = self.core.open_session(SessionStart.parse(fields_of(request)))
            async with contextlib.aclosing(self.core.session_events(live)) as events:
                async for event in events:
                    yield event.proto()

    async def update_prompt(
        self, request: api_pb2.UpdateSessionPromptRequest, context
    ) -> api_pb2.UpdateSessionPromptResponse:
        async def work() -> api_pb2.UpdateSessionPromptResponse:
            live = self.core.session(request.session_id, request.session_token)
            version, start = await self.core.update_prompt(live, request.prompt)
            return api_pb2.UpdateSessionPromptResponse(
                session_id=request.session_id, prompt_version=version, from_chunk=start
            )

        return await self.unary(request, context, work)

    async def close_session(
        self, request: api_pb2.CloseSessionRequest, context
    ) -> api_pb2.CloseSessionResponse:
        async def work() -> api_pb2.CloseSessionResponse:
            self.core.session(request.session_id, request.session_token).request_stop()
            return api_pb2.CloseSessionResponse(session_id=request.session_id, closed=True)

        return await self.unary(request, context, work)

    async def list_models(
        self, request: api_pb2.ListModelsRequest, context
    ) -> api_pb2.ListModelsResponse:
        fields = ("id", "object", "created", "owned_by")
        models = [api_pb2.Model(**{f: m[f] for f in fields}) for m in self.core.models()]
        return api_pb2.ListModelsResponse(data=models)
