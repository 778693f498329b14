"""Each stage call gets its own Serve internal request id (services/protocol/routing.py)."""

from __future__ import annotations

import asyncio

from ray.serve import context

from services.protocol.routing import own_request_id


def test_concurrent_calls_of_one_request_get_their_own_internal_ids_and_keep_the_request_id():
    async def call() -> tuple[str, str]:
        own_request_id()
        current = context._get_serve_request_context()
        await asyncio.sleep(0)
        return current.request_id, current._internal_request_id

    async def go():
        context._set_request_context(request_id="req-1", _internal_request_id="shared")
        return await asyncio.gather(call(), call(), call())

    answers = asyncio.run(go())
    assert {request_id for request_id, _ in answers} == {"req-1"}  # logs still name the request
    internal = [i for _, i in answers]
    assert len(set(internal)) == 3 and "shared" not in internal
