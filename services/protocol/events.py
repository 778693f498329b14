"""What a streaming session sends its client, as typed events with one encoding per transport:
`message()` is the WebSocket JSON (followed by `media` as a binary message when there is one),
`proto()` the gRPC `histream.v1.SessionEvent`. Both are made from the same `fields()`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from histream_model.shape import VideoShape
from protos.histream.v1 import api_pb2, stages_pb2
from services.protocol.vocab import EndReason


class _Event:
    kind: ClassVar[str]  # the WebSocket message's "type"
    oneof: ClassVar[str]  # its field in histream.v1.SessionEvent
    wire: ClassVar[Any]  # that field's message class

    @property
    def payload(self) -> bytes | None:
        """The media sent after the JSON (and as `data` in gRPC), if the event has any."""
        return getattr(self, "media", None)

    def fields(self) -> dict:
        """What the client is told, besides the media."""
        return {k: v for k, v in asdict(self).items() if k != "media"}  # type: ignore[call-overload]

    def message(self) -> dict:
        size = {} if self.payload is None else {"bytes": len(self.payload)}
        return {"type": self.kind, **self.fields(), **size}

    def proto(self) -> api_pb2.SessionEvent:
        data = {} if self.payload is None else {"data": self.payload}
        return api_pb2.SessionEvent(**{self.oneof: self.wire(**self.fields(), **data)})


@dataclass(frozen=True)
class SessionQueued(_Event):
    """The session waits for capacity on the stages."""

    kind, oneof, wire = "queued", "queued", api_pb2.SessionQueued

    position: int  # sessions waiting on this gateway replica, this one included (1: next)


@dataclass(frozen=True)
class SessionStarted(_Event):
    kind, oneof, wire = "session.started", "started", api_pb2.SessionStarted

    session_id: str  # public id: where the session's objects are stored, and for prompt updates
    width: int
    height: int
    fps: int
    num_chunks: int
    num_frames: int
    playlist_key: str  # where the HLS playlist grows in storage
    session_token: str  # the secret that prompt updates, closes and resumes by id must quote
    resumed: bool = False  # a resume: chunks go on after the client's last one
    mode: str = ""  # the generation mode the session runs (histream_model.config.MODES)
    # started without num_frames: runs until closed, or for at most num_frames (its cap)
    endless: bool = False

    @classmethod
    def of(
        cls,
        session_id: str,
        shape: VideoShape,
        fps: int,
        playlist_key: str,
        token: str,
        resumed: bool = False,
        endless: bool = False,
    ) -> SessionStarted:
        frames, chunks, size = shape.num_frames, shape.num_chunks, (shape.width, shape.height)
        return cls(
            session_id, *size, fps, chunks, frames, playlist_key, token, resumed,
            shape.mode.name, endless,
        )  # fmt: skip


@dataclass(frozen=True)
class InitSegment(_Event):
    kind, oneof, wire = "init", "init", api_pb2.InitSegment

    media: bytes  # fMP4 init segment (ftyp + moov)


@dataclass(frozen=True)
class ChunkReady(_Event):
    """One decoded chunk, in order."""

    kind, oneof, wire = "chunk", "chunk", api_pb2.ChunkSegment
    # what a client is told of a chunk, besides its media
    PUBLIC: ClassVar = ("index", "first_frame", "num_frames", "prompt_version", "latents_sha256")

    index: int  # chunk number, 0-based
    first_frame: int  # first video frame of its segment
    num_frames: int
    media: bytes  # fMP4 media segment (moof + mdat)
    object_key: str  # where the decode pool stored it ("" for video jobs)
    prompt_version: int  # which prompt the chunk was generated under (0: the first)
    latents: stages_pb2.Tensor  # the chunk's clean high-res latents, exact bytes
    latents_sha256: str
    denoise_seconds: float  # denoising stages' wall time for the chunk
    decode_seconds: float  # VAE decode + encode
    kv_bytes: int  # cache bytes the session holds on the denoisers

    def fields(self) -> dict:
        return {name: getattr(self, name) for name in self.PUBLIC}


@dataclass(frozen=True)
class PromptApplied(_Event):
    """The chunks from `from_chunk` on are generated under prompt `prompt_version`."""

    kind, oneof, wire = "prompt.applied", "prompt_updated", api_pb2.PromptUpdated

    prompt_version: int
    from_chunk: int


@dataclass(frozen=True)
class SessionEnded(_Event):
    kind, oneof, wire = "session.ended", "ended", api_pb2.SessionEnded

    reason: EndReason  # COMPLETED, CLOSED or PROTOCOL_ERROR: a client gone away is sent nothing

    def fields(self) -> dict:
        return {"reason": str(self.reason)}


SessionEvent = (
    SessionQueued | SessionStarted | InitSegment | ChunkReady | PromptApplied | SessionEnded
)
