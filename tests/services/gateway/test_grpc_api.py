"""The gRPC adapter's request handling without Ray (services/gateway/grpc.py): what an
`UpdateSessionPrompt` request becomes (README, *gRPC*: proto3's unset 0 and "" mean a
1-chunk cut and linear interpolation)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from protos.histream.v1 import api_pb2
from services.gateway.grpc import GrpcApi
from services.gateway.requests import check_prompt_update
from services.sessions.prompts import PromptUpdate


def update(request: api_pb2.UpdateSessionPromptRequest) -> tuple[PromptUpdate, tuple]:
    """The prompt update the core is handed, and the reply's (version, from_chunk)."""
    seen = []

    async def update_prompt_by_id(session_id, token, change, tenant):
        seen.append((session_id, token, tenant, check_prompt_update(change, 2000)))
        return 4, 7

    api = GrpcApi()
    api.core = SimpleNamespace(  # type: ignore[assignment]
        caller=lambda authorization: "default",
        streams=SimpleNamespace(update_prompt_by_id=update_prompt_by_id),
    )
    reply = asyncio.run(GrpcApi.UpdateSessionPrompt(api, request))
    ((session_id, token, tenant, change),) = seen
    assert (session_id, token, tenant) == ("sess_1", "tok", "default")
    return change, (reply.session_id, reply.prompt_version, reply.from_chunk)


def test_unset_transition_fields_mean_a_cut():
    request = api_pb2.UpdateSessionPromptRequest(
        session_id="sess_1", session_token="tok", prompt="a whale"
    )
    change, reply = update(request)
    assert change == PromptUpdate("a whale", 1, "linear", False)
    assert reply == ("sess_1", 4, 7)


def test_set_transition_fields_are_taken():
    request = api_pb2.UpdateSessionPromptRequest(
        session_id="sess_1", session_token="tok", prompt="a whale", transition_chunks=3,
        interpolation="slerp", recache=True,
    )  # fmt: skip
    assert update(request)[0] == PromptUpdate("a whale", 3, "slerp", True)


@pytest.mark.parametrize(("chunks", "interpolation"), [(65, "linear"), (2, "cubic")])
def test_bad_transition_fields_are_named(chunks, interpolation):
    from services.errors import InvalidArgument

    request = api_pb2.UpdateSessionPromptRequest(
        session_id="sess_1", session_token="tok", prompt="a whale",
        transition_chunks=chunks, interpolation=interpolation,
    )  # fmt: skip
    with pytest.raises(InvalidArgument) as bad:
        update(request)
    assert bad.value.param == ("transition_chunks" if chunks > 64 else "interpolation")
