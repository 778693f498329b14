"""What a streaming session sends its client, as typed events with one encoding per transport:
`message()` is the WebSocket JSON (followed by `media` as a binary message when there is one),
`proto()` the gRPC `histream.v1.SessionEvent`."""

from __future__ import annotations

from dataclasses import dataclass

from protos.histream.v1 import api_pb2, stages_pb2
from services.protocol.vocab import EndReason


@dataclass(frozen=True)
class SessionStarted:
    session_id: str  # public id: where the session's objects are stored, and for prompt updates
    width: int
    height: int
    fps: int
    num_chunks: int
    num_frames: int
    playlist_key: str  # where the HLS playlist grows in storage

    media = None

    def message(self) -> dict:
        return {
            "type": "session.started",
            "session_id": self.session_id,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "num_chunks": self.num_chunks,
            "num_frames": self.num_frames,
            "playlist_key": self.playlist_key,
        }

    def proto(self) -> api_pb2.SessionEvent:
        return api_pb2.SessionEvent(
            started=api_pb2.SessionStarted(
                session_id=self.session_id,
                width=self.width,
                height=self.height,
                fps=self.fps,
                num_chunks=self.num_chunks,
                num_frames=self.num_frames,
                playlist_key=self.playlist_key,
            )
        )


@dataclass(frozen=True)
class InitSegment:
    media: bytes  # fMP4 init segment (ftyp + moov)

    def message(self) -> dict:
        return {"type": "init", "bytes": len(self.media)}

    def proto(self) -> api_pb2.SessionEvent:
        return api_pb2.SessionEvent(init=api_pb2.InitSegment(data=self.media))


@dataclass(frozen=True)
class ChunkReady:
    """One decoded chunk, in order."""

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

    def message(self) -> dict:
        return {
            "type": "chunk",
            "index": self.index,
            "first_frame": self.first_frame,
            "num_frames": self.num_frames,
            "prompt_version": self.prompt_version,
            "latents_sha256": self.latents_sha256,
            "bytes": len(self.media),
        }

    def proto(self) -> api_pb2.SessionEvent:
        return api_pb2.SessionEvent(
            chunk=api_pb2.ChunkSegment(
                index=self.index,
                first_frame=self.first_frame,
                num_frames=self.num_frames,
                data=self.media,
                prompt_version=self.prompt_version,
                latents_sha256=self.latents_sha256,
            )
        )


@dataclass(frozen=True)
class PromptApplied:
    """The chunks from `from_chunk` on are generated under prompt `prompt_version`."""

    prompt_version: int
    from_chunk: int

    media = None

    def message(self) -> dict:
        return {
            "type": "prompt.applied",
            "prompt_version": self.prompt_version,
            "from_chunk": self.from_chunk,
        }

    def proto(self) -> api_pb2.SessionEvent:
        return api_pb2.SessionEvent(
            prompt_updated=api_pb2.PromptUpdated(
                prompt_version=self.prompt_version, from_chunk=self.from_chunk
            )
        )


@dataclass(frozen=True)
class SessionEnded:
    reason: EndReason  # COMPLETED or CLOSED: a client that went away is sent nothing

    media = None

    def message(self) -> dict:
        return {"type": "session.ended", "reason": str(self.reason)}

    def proto(self) -> api_pb2.SessionEvent:
        return api_pb2.SessionEvent(ended=api_pb2.SessionEnded(reason=str(self.reason)))


SessionEvent = SessionStarted | InitSegment | ChunkReady | PromptApplied | SessionEnded
