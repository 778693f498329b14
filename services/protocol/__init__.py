"""The typed vocabulary every process of the service shares.

- `vocab.py`      enums: stream kind, stage name, resolution, end reason (proto enums on the wire);
- `lifecycle.py`  the session status as an enum state machine with checked transitions;
- `events.py`     what a streaming session sends, encoded for WebSocket and gRPC;
- `spec.py`       a validated request (`Generation`), its shape to and from `SessionSpec`;
- `codec.py`      torch tensors to and from the protocol's `Tensor` message;
- `snapshot.py`   reading a session snapshot (kept latents, prompts, a decoder's tail);
- `identity.py`   which replica is speaking;
- `claims.py`     leases on resuming a session (held by the mailbox, or by a lone gateway);
- `servicer.py`   the gRPC servicer Serve's proxy registers (tolerant of malformed requests).
"""

from services.protocol.codec import digest, from_proto, to_proto
from services.protocol.events import (
    ChunkReady,
    InitSegment,
    PromptApplied,
    SessionEnded,
    SessionEvent,
    SessionQueued,
    SessionStarted,
)
from services.protocol.lifecycle import (
    SESSION_TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    SessionStatus,
)
from services.protocol.spec import Generation, session_spec, shape_of, video_shape
from services.protocol.vocab import EndReason, Resolution, StageName, StreamKind

__all__ = [
    "SESSION_TRANSITIONS",
    "ChunkReady",
    "EndReason",
    "Generation",
    "IllegalTransition",
    "InitSegment",
    "Lifecycle",
    "PromptApplied",
    "Resolution",
    "SessionEnded",
    "SessionEvent",
    "SessionQueued",
    "SessionStarted",
    "SessionStatus",
    "StageName",
    "StreamKind",
    "digest",
    "from_proto",
    "session_spec",
    "shape_of",
    "to_proto",
    "video_shape",
]
