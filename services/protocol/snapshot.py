"""Reading a `SessionSnapshot` (stages.proto): which prompt each chunk was made under, the
latents it keeps, the tail a decoder resumes from. The session driver writes snapshots
(services/sessions/record.py); the stages' restore hooks read them with these."""

from __future__ import annotations

import torch

from protos.histream.v1 import stages_pb2
from services.protocol.codec import from_proto


def prompt_index(snapshot: stages_pb2.SessionSnapshot, chunk: int) -> int:
    """Index into `snapshot.prompts` of the prompt chunk `chunk` is generated under."""
    index = 0
    for i, change in enumerate(snapshot.prompts):
        if change.from_chunk <= chunk:
            index = i
    return index


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
