"""Session orchestration in pure asyncio (no model, no transport): runs in the gateway process
and reaches the stages only through handles, so it is tested against in-process fakes.

- `remote.py`   the stage calls of one session, pinned to its replicas; `StageHandles`;
- `driver.py`   `SessionDriver`: one session through the stages, chunk by chunk, pipelined;
- `prompts.py`  prompt versions: which prompt applies from which chunk;
- `live.py`     streaming sessions: their events, stop requests, the registry;
- `record.py`, `restore.py`  what a driver keeps to rebuild its session anywhere, the snapshot
                in storage, the restore and retry when a stage lost the session.
"""

from services.sessions.driver import SessionDriver
from services.sessions.live import LiveSession, SessionRegistry
from services.sessions.prompts import PromptVersions
from services.sessions.remote import SessionPlan, SessionStages, StageHandles
from services.sessions.restore import Durability, SnapshotStore

__all__ = [
    "Durability",
    "LiveSession",
    "PromptVersions",
    "SessionDriver",
    "SessionPlan",
    "SessionRegistry",
    "SessionStages",
    "SnapshotStore",
    "StageHandles",
]
