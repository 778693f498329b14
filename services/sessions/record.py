"""What a session driver keeps of its session's past, so that any stage can rebuild its share
anywhere (`RestoreSession`, `RestoreStream`) and the session survives its driver (the snapshot
in storage): each kept chunk's clean latents, each chunk's frame count, the prompts and the
chunk each applies from. Never caches: they are a function of these.
"""

from __future__ import annotations

import math
import time

from histream_model.conditioning import PromptChange, conditioning, in_transition, text_changes_at
from histream_model.schedules.restore import snapshot_chunks
from protos.histream.v1 import stages_pb2
from services.protocol import from_proto, session_spec, to_proto
from services.protocol.snapshot import prompt_changes
from services.sessions.remote import SessionPlan


class SessionRecord:
    """The latents, frame counts and prompts of one session, pruned to what a restore reads."""

    def __init__(
        self,
        plan: SessionPlan,
        window_chunks: int,
        decode_frames: int,
        lookahead: int,
        replay_chunks: int = 60,
    ):
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
        # an endless session keeps the frame counts and digests of its latest `replay` chunks
        # only (a resume re-sends at most those), and the frames of the chunks before them
        self.replay = max(replay_chunks, self.window) if plan.endless else None
        self.first_kept = 0
        self.frames_before = 0
        self._changes: tuple[tuple, list[PromptChange]] | None = None  # decoded, for blends

    @classmethod
    def from_snapshot(
        cls,
        plan: SessionPlan,
        snapshot: stages_pb2.SessionSnapshot,
        window_chunks: int,
        decode_frames: int,
        lookahead: int,
        replay_chunks: int = 60,
    ) -> SessionRecord:
        """The record a snapshot was made from (its prompts' contexts still to be encoded)."""
        record = cls(plan, window_chunks, decode_frames, lookahead, replay_chunks)
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
        record.first_kept, record.frames_before = snapshot.first_chunk, snapshot.frames_before
        return record

    def prompt(
        self,
        version: int,
        from_chunk: int,
        text: str,
        context: stages_pb2.Tensor,
        transition_chunks: int = 1,
        interpolation: str = "linear",
        recache: bool = False,
    ) -> None:
        change = stages_pb2.PromptChange(
            version=version, from_chunk=from_chunk, prompt=text,
            transition_chunks=transition_chunks, interpolation=interpolation, recache=recache,
        )  # fmt: skip
        self.prompts.append(change)
        self.contexts.append(context)
        self._changes = None

    def changes(self) -> list[PromptChange]:
        """The prompts as histream_model.conditioning reads them (contexts decoded once)."""
        key = (id(self.prompts), len(self.prompts))  # take_up replaces the lists
        if self._changes is None or self._changes[0] != key:
            decoded = [from_proto(c) for c in self.contexts]
            self._changes = (key, prompt_changes(self.prompts, decoded))
        return self._changes[1]

    def text_changes(self, chunk: int) -> bool:
        """Whether chunk `chunk`'s text context differs from the chunk before's (a change
        starts there, or a transition goes on or ends)."""
        return text_changes_at(self.prompts, chunk)

    def conditioning(self, chunk: int) -> stages_pb2.Tensor:
        """The text context chunk `chunk` is generated under (a transition's: its blend)."""
        if in_transition(self.prompts, chunk):
            return to_proto(conditioning(self.changes(), chunk))
        latest = max(i for i, p in enumerate(self.prompts) if p.from_chunk <= chunk)
        return self.contexts[latest]

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
        if self.replay is not None:  # endless: the same bytes at chunk 1000 as at chunk 3
            while self.first_kept < self.decoded - self.replay:
                self.frames_before += self.frames.pop(self.first_kept, 0)
                self.digests.pop(self.first_kept, None)
                self.first_kept += 1

    def first_frame(self, chunk: int) -> int:
        """The first video frame of chunk `chunk` (at least `first_kept`)."""
        if chunk < self.first_kept:
            raise ValueError(f"chunk {chunk} is before the first one kept ({self.first_kept})")
        kept = range(self.first_kept, chunk)
        return self.frames_before + sum(self.frames.get(i, 0) for i in kept)

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
        # the anchor chunk (its latents: restores replay it) and the chunks kept from first_kept
        indices = [0] if self.first_kept else []
        chunks = [
            stages_pb2.ChunkRecord(
                index=i,
                num_frames=self.frames.get(i, 0),
                latents=self.latents.get(i),
                latents_sha256=self.digests.get(i, ""),
                writes=self.writes.get(i, {}),
            )
            for i in [*indices, *range(self.first_kept, next_chunk)]
        ]
        return stages_pb2.SessionSnapshot(
            spec=session_spec(routing_id, *plan.spec_args),
            kind=plan.kind.to_proto(),
            object_id=plan.object_id,
            fps=plan.fps,
            next_chunk=next_chunk,
            prompts=self.prompts,  # those from later chunks are not read
            chunks=chunks,
            token_sha256=self.token_sha256,
            saved_at=int(time.time()),
            first_chunk=self.first_kept,
            frames_before=self.frames_before,
        )

    def restore(self, next_chunk: int, routing_id: str) -> stages_pb2.RestoreRequest:
        return stages_pb2.RestoreRequest(
            session_id=routing_id,
            snapshot=self.snapshot(next_chunk, routing_id),
            contexts=self.contexts,
        )
