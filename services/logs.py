"""The service's logs: every logger is `histream.<part>`; in a Serve replica they write through
Serve's replica logger, so they land in the replica's file under `logs/serve/` with its request
ids, in the encoding the deployment's `logging_config` chose (`log_encoding`: TEXT or JSON).

Log calls about one session or video pass `extra=ids(...)`: in JSON each id is a field of its
own (`tenant`, `session_id`, `video_id`), so a log pipeline filters by them without parsing
messages. Prompts and API keys are never logged, in any field.
"""

from __future__ import annotations

import logging

ROOT = "histream"
SERVE_LOGGER = "ray.serve"


def ids(
    tenant: str | None = None, session_id: str | None = None, video_id: str | None = None
) -> dict:
    """The `extra` of a log call about one tenant's session or video (None fields left out)."""
    fields = {"tenant": tenant, "session_id": session_id, "video_id": video_id}
    return {name: value for name, value in fields.items() if value is not None}


def through_serve(level: int = logging.INFO) -> None:
    """In a Serve replica (call from the deployment's constructor): the `histream` loggers
    write with the handlers Serve set up for the replica, not to the worker's stderr."""
    serve_handlers = logging.getLogger(SERVE_LOGGER).handlers
    if not serve_handlers:  # not in a replica (tests, the local CLI): leave logging alone
        return
    ours = logging.getLogger(ROOT)
    ours.handlers = list(serve_handlers)
    ours.setLevel(level)
    ours.propagate = False
