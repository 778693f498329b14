"""Which process is speaking: a Serve replica's id (in messages, logs and job leases)."""

from __future__ import annotations

import os
import socket

from ray import serve


def replica_name() -> str:
    """This Serve replica's unique id; outside a replica (direct use, tests), host and pid."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{socket.gethostname()}:{os.getpid()}"
