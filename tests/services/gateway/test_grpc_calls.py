"""`histream.v1.HiStream`'s RPCs without Ray (README, *gRPC*): the gateway's gRPC methods called
as Serve's proxy calls them (the request, and the call's context), over the real stages in this
process (tiny preset). A video is made, read, listed and deleted; a session streams its events
and a resumed one goes on after the client's last chunk; the caller is authenticated from the
call's metadata; every failure sets the call's status code and details (a bug: INTERNAL with an
error id, its details only in the log)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from protos.histream.v1 import api_pb2
from services.gateway.core import GatewayCore
from services.protocol.servicer import UndecodableRequest
from tests.services.fakes import real_stages
from tests.services.gateway.local_app import LocalGateway, settings_for

KEY = "sk-grpc-0123456789"


class Context:
    """What a grpc.aio ServicerContext gives the methods: metadata in, status and trailers out."""

    def __init__(self, authorization: str | None = None) -> None:
        self.metadata = () if authorization is None else (("authorization", authorization),)
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: tuple = ()

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers: tuple) -> None:
        self.trailers = trailers


def on_gateway(tmp_path, test: Callable[[LocalGateway], Awaitable[Any]], **settings) -> Any:
    """`test(gateway)` on one event loop, the core's background work running beside it."""

    async def run() -> Any:
        core = GatewayCore(settings_for(tmp_path, **settings), real_stages(tmp_path).handles)
        core.start_background()
        try:
            return await asyncio.wait_for(test(LocalGateway(core)), 120)
        finally:
            await core.drain(timeout_s=5)

    return asyncio.run(run())


async def failing(call: Awaitable[Any], context: Context) -> Exception:
    """The error `call` raised; its status is then on `context`."""
    try:
        await call
    except Exception as err:
        assert context.code is not None, "an error without a status"
        return err
    raise AssertionError("the call did not fail")


async def until_finished(gateway: LocalGateway, video_id: str) -> api_pb2.Video:
    while True:
        video = await gateway.GetVideo(api_pb2.GetVideoRequest(id=video_id), Context())
        if video.status in ("completed", "failed"):
            return video
        await asyncio.sleep(0.05)


def test_a_video_is_made_read_listed_and_deleted(tmp_path):
    async def test(gateway):
        made = []
        for seed in (1, 2):
            request = api_pb2.CreateVideoRequest(prompt="a fox", seconds="1", seed=seed)
            made.append(await gateway.CreateVideo(request, Context()))
        done = await until_finished(gateway, made[0].id)
        page = await gateway.ListVideos(api_pb2.ListVideosRequest(limit=1), Context())
        oldest = await gateway.ListVideos(api_pb2.ListVideosRequest(order="asc"), Context())
        await until_finished(gateway, made[1].id)
        deleted = await gateway.DeleteVideo(api_pb2.DeleteVideoRequest(id=made[0].id), Context())
        context = Context()
        gone = await failing(
            gateway.GetVideo(api_pb2.GetVideoRequest(id=made[0].id), context), context
        )
        return made, done, page, oldest, deleted, (context, gone)

    made, done, page, oldest, deleted, (context, gone) = on_gateway(tmp_path, test)
    assert [v.seed for v in made] == [1, 2] and made[0].status == "queued"
    assert (made[0].size, made[0].num_frames, made[0].object) == ("192x128", 21, "video")
    assert (done.status, done.progress) == ("completed", 100) and done.completed_at > 0
    assert [v.id for v in page.data] == [made[1].id] and page.has_more
    assert (page.first_id, page.last_id) == (made[1].id, made[1].id)
    assert [v.id for v in oldest.data] == [made[0].id, made[1].id] and not oldest.has_more
    assert (deleted.id, deleted.deleted) == (made[0].id, True)
    assert context.code == grpc.StatusCode.NOT_FOUND and made[0].id in context.details
    assert type(gone).__name__ == "NotFound"


def test_a_session_streams_its_events_and_a_resume_goes_on_after_the_last_chunk(tmp_path):
    async def test(gateway):
        request = api_pb2.StreamSessionRequest(prompt="a cat", size="128x64", num_frames=57)
        first = []
        async for event in gateway.StreamSession(request, Context()):
            first.append(event)
            if event.WhichOneof("event") == "chunk" and event.chunk.index == 1:
                break  # the client goes away after chunk 1
        started = first[0].started
        resume = api_pb2.ResumeSessionRequest(
            session_id=started.session_id, session_token=started.session_token, last_chunk=1
        )
        return first, [e async for e in gateway.ResumeSession(resume, Context())]

    first, second = on_gateway(tmp_path, test)
    kinds = [e.WhichOneof("event") for e in first]
    assert kinds == ["started", "init", "chunk", "chunk"]
    assert (first[0].started.width, first[0].started.num_chunks) == (128, 5)
    assert first[1].init.data and all(e.chunk.data for e in first[2:])
    assert second[0].started.resumed and second[0].started.session_id == (
        first[0].started.session_id
    )
    assert second[1].init.data == first[1].init.data  # again, for a player starting over
    chunks = [e.chunk.index for e in second if e.WhichOneof("event") == "chunk"]
    assert chunks == [2, 3, 4]
    assert second[-1].ended.reason == "completed"


def test_a_session_closed_by_id_ends_closed_and_a_bad_token_is_refused(tmp_path):
    async def test(gateway):
        request = api_pb2.StreamSessionRequest(prompt="a cat", size="128x64", num_frames=201)
        events = gateway.StreamSession(request, Context())
        started = (await anext(events)).started
        wrong = Context()
        refused = await failing(
            gateway.CloseSession(
                api_pb2.CloseSessionRequest(session_id=started.session_id, session_token="x"),
                wrong,
            ),
            wrong,
        )
        close = api_pb2.CloseSessionRequest(
            session_id=started.session_id, session_token=started.session_token
        )
        closed = await gateway.CloseSession(close, Context())
        rest = [e async for e in events]
        return wrong, refused, closed, rest

    wrong, refused, closed, rest = on_gateway(tmp_path, test)
    assert wrong.code == refused.grpc_status and wrong.details == refused.message
    assert wrong.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    assert closed.closed and rest[-1].ended.reason == "closed"
    assert len([e for e in rest if e.WhichOneof("event") == "chunk"]) < 17


def test_errors_set_the_calls_status_and_a_bug_is_internal_with_an_error_id(
    tmp_path, monkeypatch, caplog
):
    async def test(gateway):
        statuses = {}
        calls = {
            "bad size": lambda: gateway.CreateVideo(
                api_pb2.CreateVideoRequest(prompt="a fox", size="100x100"), context
            ),
            "bad limit": lambda: gateway.ListVideos(api_pb2.ListVideosRequest(limit=500), context),
            "undecodable": lambda: gateway.GetVideo(
                UndecodableRequest("histream.v1.GetVideoRequest", "truncated message"), context
            ),
            "bad session size": lambda: anext(
                gateway.StreamSession(api_pb2.StreamSessionRequest(size="7x7"), context)
            ),
        }
        for name, call in calls.items():
            context = Context()
            await failing(call(), context)
            statuses[name] = (context.code, context.details)

        async def broken(*args):
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(gateway.core.videos, "get", broken)
        context = Context()
        bug = await failing(gateway.GetVideo(api_pb2.GetVideoRequest(id="v"), context), context)
        return statuses, context, bug

    statuses, context, bug = on_gateway(tmp_path, test)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert statuses["bad size"][0] == invalid and "100x100" in statuses["bad size"][1]
    assert statuses["bad limit"] == (invalid, "limit=500 must be in [1, 100]")
    assert statuses["undecodable"] == (
        invalid, "the request is not a valid histream.v1.GetVideoRequest: truncated message"
    )  # fmt: skip
    assert statuses["bad session size"][0] == invalid
    assert context.code == grpc.StatusCode.INTERNAL and "disk on fire" not in context.details
    error_id = re.search(r"quote (err_[0-9a-f]{16})", context.details).group(1)
    assert type(bug).__name__ == "Internal" and error_id in bug.message
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_full_queue_sets_resource_exhausted_with_a_retry_after_trailer(tmp_path):
    async def test(gateway):
        request = api_pb2.CreateVideoRequest(prompt="a fox", seconds="1")
        accepted = 0
        while True:  # one may run, one waits: the third at the latest is refused
            context = Context()
            try:
                await gateway.CreateVideo(request, context)
            except Exception:
                return accepted, context
            accepted += 1

    accepted, context = on_gateway(tmp_path, test, max_running_jobs=1, max_queued_jobs=1)
    assert accepted in (1, 2)
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_jobs=1" in context.details
    assert context.trailers == (("retry-after", "5"),)


def test_the_caller_is_authenticated_from_the_calls_metadata(tmp_path):
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"alpha": {"keys": [KEY]}}}))

    async def test(gateway):
        request = api_pb2.ListModelsRequest()
        refused = []
        for authorization in (None, "Bearer sk-nope"):
            context = Context(authorization)
            await failing(gateway.ListModels(request, context), context)
            refused.append((context.code, context.details))
        models = await gateway.ListModels(request, Context(f"Bearer {KEY}"))
        local_front = await gateway.ListModels(request, None, authorization=KEY)
        return refused, models, local_front

    refused, models, local_front = on_gateway(tmp_path, test, tenants_file=str(tenants))
    assert refused[0][0] == refused[1][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "no API key" in refused[0][1] and refused[1][1] == "the API key is not valid"
    assert models.data[0].id == "tiny" and local_front == models
    assert {m.id for m in models.data} >= {"histream+", "hiar", "diagonal"}


@pytest.mark.parametrize("transition_chunks", [0, 2])
def test_a_prompt_update_by_id_reaches_the_running_session(tmp_path, transition_chunks):
    async def test(gateway):
        request = api_pb2.StreamSessionRequest(prompt="a cat", size="128x64", num_frames=57)
        events = gateway.StreamSession(request, Context())
        started = (await anext(events)).started

        async def read() -> list:  # a client reads its stream while it sends the update
            return [e async for e in events]

        rest = asyncio.ensure_future(read())
        update = api_pb2.UpdateSessionPromptRequest(
            session_id=started.session_id, session_token=started.session_token,
            prompt="a dog", transition_chunks=transition_chunks,
        )  # fmt: skip
        reply = await gateway.UpdateSessionPrompt(update, Context())
        return reply, await rest

    reply, events = on_gateway(tmp_path, test)
    assert reply.prompt_version == 1 and 0 <= reply.from_chunk < 5
    applied = [e.prompt_updated for e in events if e.WhichOneof("event") == "prompt_updated"]
    assert [(a.prompt_version, a.from_chunk) for a in applied] == [(1, reply.from_chunk)]
    versions = [e.chunk.prompt_version for e in events if e.WhichOneof("event") == "chunk"]
    assert versions == [0] * reply.from_chunk + [1] * (5 - reply.from_chunk)
