"""Reading a `SessionSnapshot` (stages.proto): which prompt each chunk was made under, the
latents it keeps, the tail a decoder resumes from. The session driver writes snapshots
(services/sessions/record.py); the stages' restore hooks read them with these."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from histream_model.conditioning import PromptChange
from protos.histream.v1 import stages_pb2
from services.protocol.codec import from_proto


def prompt_changes(
    prompts: Sequence[stages_pb2.PromptChange], contexts: Sequence[torch.Tensor]
) -> list[PromptChange]:
    """A session's prompts with their text contexts, as histream_model.conditioning reads them
    (which conditioning each chunk is under, transitions included)."""
    if len(contexts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(contexts)} text contexts")
    return [
        PromptChange(
            p.from_chunk, context, p.transition_chunks or 1, p.interpolation or "linear", p.recache
        )
        for p, context in zip(prompts, contexts, strict=True)
    ]


def kept_latents(snapshot: stages_pb2.SessionSnapshot) -> dict[int, torch.Tensor]:
    """The clean high-res latents the snapshot keeps, by chunk index."""
    return {c.index: from_proto(c.latents) for c in snapshot.chunks if c.HasField("latents")}


def kept_writes(snapshot: stages_pb2.SessionSnapshot) -> dict[tuple[int, int], torch.Tensor]:
    """The write inputs the snapshot keeps, by (chunk, phase) (see ChunkLatents.write_input)."""
    return {
        (c.index, phase): from_proto(tensor)
        for c in snapshot.chunks
        for phase, tensor in c.writes.items()
    }


def decode_tail(
    snapshot: stages_pb2.SessionSnapshot, frames: int
) -> tuple[torch.Tensor | None, int]:
    """The last `frames` latent frames decoded (as many as the kept chunks hold, contiguous up
    to the last chunk) and how many latent frames were decoded before them."""
    kept = kept_latents(snapshot)
    tail: list[torch.Tensor] = []
    index = snapshot.next_chunk - 1
    while index in kept and sum(t.shape[2] for t in tail) < frames:
        tail.insert(0, kept[index])
        index -= 1
    if not tail:
        return None, 0
    latents = torch.cat(tail, dim=2)[:, :, -frames:]  # (B, C, K, h, w)
    per_chunk = tail[-1].shape[2]  # latent frames per chunk (M)
    return latents, snapshot.next_chunk * per_chunk - latents.shape[2]


def stored_frames(snapshot: stages_pb2.SessionSnapshot) -> tuple[int, list[int]]:
    """(the first chunk of the run the snapshot keeps records of, up to its next chunk; the
    video frames of each). Endless sessions keep their latest chunks only (`first_chunk`)."""
    tail = [
        c.num_frames
        for c in snapshot.chunks
        if snapshot.first_chunk <= c.index < snapshot.next_chunk
    ]
    return snapshot.first_chunk, tail


def frames_done(snapshot: stages_pb2.SessionSnapshot) -> int:
    """Video frames of every chunk before the snapshot's next chunk."""
    return snapshot.frames_before + sum(stored_frames(snapshot)[1])
