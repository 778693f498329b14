"""The names every process of the service agrees on: stream kinds, stages, resolutions, why a
session ended. String-valued enums, so they log and compare as the words they are; the proto
enum where a name crosses the stage protocol's wire."""

from __future__ import annotations

import enum

from histream_model.config import Resolution
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument


class StreamKind(enum.StrEnum):
    """What the decode pool makes of a session's chunks."""

    VIDEO = "video"  # a video job: one MP4 and its manifest at the end
    SESSION = "session"  # a streaming session: a segment per chunk + a growing HLS playlist

    def to_proto(self) -> stages_pb2.StreamKind.ValueType:
        return _KIND_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: stages_pb2.StreamKind.ValueType) -> StreamKind:
        for kind, wire in _KIND_TO_PROTO.items():
            if wire == value:
                return kind
        names = [k.name for k in cls]
        raise InvalidArgument(f"stream kind {value} must be one of {names}", param="kind")


_KIND_TO_PROTO = {
    StreamKind.VIDEO: stages_pb2.STREAM_KIND_VIDEO,
    StreamKind.SESSION: stages_pb2.STREAM_KIND_SESSION,
}


class StageName(enum.StrEnum):
    """The Serve deployments of the application, by the names serve configs refer to."""

    GATEWAY = "Gateway"  # ingress: HTTP, WebSocket and gRPC; no model
    STRUCTURE = "StructureStage"  # low resolution: KV_low, the text encoder
    REFINE = "RefineStage"  # high resolution: KV_high; hands Down(x0) to the structure stage
    DECODE = "DecodePool"  # streaming VAE decode -> fMP4 -> storage
    MAILBOX = "SessionMailbox"  # one replica: control calls reach a session's gateway replica
    # HiAR's pipeline (`pipeline_workers` > 0): worker w holds its share of the step caches
    STEP1 = "StepStage1"
    STEP2 = "StepStage2"
    STEP3 = "StepStage3"
    STEP4 = "StepStage4"

    @classmethod
    def step(cls, worker: int) -> StageName:
        """The deployment of step worker `worker` (0-based)."""
        return list(cls)[list(cls).index(cls.STEP1) + worker]

    @property
    def worker(self) -> int | None:
        """The step worker's index (None for the other deployments)."""
        steps = [self.STEP1, self.STEP2, self.STEP3, self.STEP4]
        return steps.index(self) if self in steps else None

    @classmethod
    def for_resolution(cls, resolution: Resolution) -> StageName:
        """The denoising stage that holds a resolution's caches and runs its phases."""
        return cls.STRUCTURE if resolution == Resolution.LOW else cls.REFINE

    @property
    def resolution(self) -> Resolution | None:
        """The resolution a denoising stage holds (None for the other deployments)."""
        return {self.STRUCTURE: Resolution.LOW, self.REFINE: Resolution.HIGH}.get(self)


class EndReason(enum.StrEnum):
    """Why a session stopped generating."""

    COMPLETED = "completed"  # every chunk was generated and sealed
    CLOSED = "closed"  # the client asked to stop; what was generated is sealed
    PROTOCOL_ERROR = "protocol_error"  # too many malformed client messages; the rest is sealed
    DISCONNECTED = "disconnected"  # the client went away; nothing more is sent
    DRAINING = "draining"  # the service is shutting down: resume the session by id later
    CANCELLED = "cancelled"  # a video job was deleted or cancelled while it ran
    FAILED = "failed"  # an error stopped it


__all__ = ["EndReason", "Resolution", "StageName", "StreamKind"]
