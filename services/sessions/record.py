"""What a session driver keeps of its session's past, so that any stage can rebuild its share
anywhere (`RestoreSession`, `RestoreStream`) and the session survives its driver (the snapshot
in storage): each kept chunk's clean latents, each chunk's frame count, the prompts and the
chunk each applies from. Never caches: they are a function of these.
"""

from __future__ import annotations

import math
import time

from histream_model.schedules.restore import snapshot_chunks
from protos.histream.v1 import stages_pb2
from services.protocol import session_spec
from services.sessions.remote import SessionPlan


class SessionRecord:
    """The latents, frame counts and prompts of one session, pruned to what a restore reads."""

    def __init__(self, plan: SessionPlan, window_chunks: int, decode_frames: int, lookahead: int):
        self.plan = plan
        shape = plan.shape
        chunk_frames = shape.preset.options.chunk_frames
        decode_chunks = math.ceil(decode_frames / chunk_frames)
        # decoding runs up to `lookahead` + 1 chunks behind denoising; a restore of either side
        # reads back from where that side stands
        self.window = max(window_chunks, decode_chunks) + lookahead + 1
        self.everything = not shape.mode.sliding_window  # full history: every chunk is read
        self.prompts: list[stages_pb2.PromptChange] = []
        self.contexts: list[stages_pb2.Tensor] = []  # the text context of each prompt
        self.latents: dict[int, stages_pb2.Tensor] = {}  # kept chunks' clean high-res latents
        self.writes: dict[int, dict[int, stages_pb2.Tensor]] = {}  # kept chunks' write inputs
        self.frames: dict[int, int] = {}  # decoded chunks' video frames
        self.digests: dict[int, str] = {}  # decoded chunks' latents_sha256, as sent
        self.denoised = 0  # chunks generated so far
        self.decoded = 0  # chunks decoded so far
        self.token_sha256 = ""  # streaming sessions: the hash a resume's token must match

    @classmethod
    def from_snapshot(
        cls,
        plan: SessionPlan,
        snapshot: stages_pb2.SessionSnapshot,
        window_chunks: int,
        decode_frames: int,
        lookahead: int,
    ) -> SessionRecord:
        """The record a snapshot was made from (its prompts' contexts still to be encoded)."""
        record = cls(plan, window_chunks, decode_frames, lookahead)
        record.prompts = list(snapshot.prompts)
        for chunk in snapshot.chunks:
            if chunk.HasField("latents"):
                record.latents[chunk.index] = chunk.latents
            if chunk.writes:
                record.writes[chunk.index] = dict(chunk.writes)
            record.frames[chunk.index] = chunk.num_frames
            record.digests[chunk.index] = chunk.latents_sha256
        record.denoised = record.decoded = snapshot.next_chunk
        record.token_sha256 = snapshot.token_sha256
        return record

    def prompt(self, version: int, from_chunk: int, text: str, context: stages_pb2.Tensor) -> None:
        change = stages_pb2.PromptChange(version=version, from_chunk=from_chunk, prompt=text)
        self.prompts.append(change)
        self.contexts.append(context)

    def denoised_chunk(
        self,
        index: int,
        latents: stages_pb2.Tensor,
        writes: dict[int, stages_pb2.Tensor] | None = None,
    ) -> None:
        self.latents[index] = latents
        if writes:
            self.writes[index] = dict(writes)
        self.denoised = max(self.denoised, index + 1)
        if not self.everything:
            keep = set(snapshot_chunks(self.denoised, 1, self.window))
            for old in [k for k in self.latents if k not in keep]:
                del self.latents[old]
                self.writes.pop(old, None)

    def decoded_chunk(self, index: int, num_frames: int, sha256: str = "") -> None:
        self.frames[index] = num_frames
        self.digests[index] = sha256
        self.decoded = max(self.decoded, index + 1)

    def prompt_version(self, chunk: int) -> int:
        """The version of the prompt chunk `chunk` was generated under."""
        version = 0
        for change in self.prompts:
            if change.from_chunk <= chunk:
                version = change.version
        return version

    def snapshot(self, next_chunk: int, routing_id: str) -> stages_pb2.SessionSnapshot:
        """The session as it stood before chunk `next_chunk`."""
        plan = self.plan
        chunks = [
            stages_pb2.ChunkRecord(
                index=i,
                num_frames=self.frames.get(i, 0),
                latents=self.latents.get(i),
                latents_sha256=self.digests.get(i, ""),
                writes=self.writes.get(i, {}),
            )
            for i in range(next_chunk)
        ]
        return stages_pb2.SessionSnapshot(
            spec=session_spec(routing_id, plan.tenant, plan.shape, plan.seed),
            kind=plan.kind.to_proto(),
            object_id=plan.object_id,
            fps=plan.fps,
            next_chunk=next_chunk,
            prompts=self.prompts,  # those from later chunks are not read
            chunks=chunks,
            token_sha256=self.token_sha256,
            saved_at=int(time.time()),
        )

    def restore(self, next_chunk: int, routing_id: str) -> stages_pb2.RestoreRequest:
        return stages_pb2.RestoreRequest(
            session_id=routing_id,
            snapshot=self.snapshot(next_chunk, routing_id),
            contexts=self.contexts,
        )
