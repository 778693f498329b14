"""Each stage call its own Serve request identity.

A call made while handling a request inherits that request's internal request id (Serve's
request context), and Serve's router matches a routed replica back to its pending call by that
id. Two calls to one deployment in flight at once from one request (a session's heartbeat and
its decode, two jobs of one batch, two prompt updates of one WebSocket) then share an id: one
of them is never handed its replica and waits forever. Giving each call a fresh internal id
(the request id, which logs and traces use, stays) keeps every call matched to its own replica.
"""

from __future__ import annotations

import dataclasses
import uuid

from ray.serve import context


def own_request_id() -> str:
    """Give the calls this task makes from here on a fresh internal request id; returns it."""
    current = context._get_serve_request_context()
    fresh = uuid.uuid4().hex
    context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=fresh))
    return fresh
