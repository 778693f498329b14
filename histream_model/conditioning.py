"""Prompt transitions: which text conditioning each chunk of a session is generated under.

A session's prompts are a list of changes, each from a chunk on. A change with
`transition_chunks` k blends the text context over k chunks, from the conditioning of the chunk
before it to its own: chunk `from_chunk + j` (j < k) is conditioned on
`blend(before, context, (j + 1) / k)`, so the k-th chunk is under the new prompt alone and k = 1
is a cut. A change arriving during another's transition starts from where that one stood. The
realtime peers blend the same way (linear, or spherical per token vector); everything here is a
function of the changes, so a stage rebuilding a session from its snapshot gets the same bits.

A change with `recache` also rebuilds the caches of the chunks before it (their commit passes
replayed over the kept window's latents) under its first chunk's conditioning, so the old prompt
stops steering through the window (LongLive's re-cache). A cache entry's conditioning is then
not its chunk's: `cache_conditioning` says which it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

INTERPOLATIONS = ("linear", "slerp")
MAX_TRANSITION_CHUNKS = 64  # longest blend a change may ask for
_PARALLEL = 1e-4  # slerp falls back to linear where two token vectors are this close to parallel


def check_transition(transition_chunks: int, interpolation: str) -> None:
    """Reject a transition the blend cannot run, naming the value and what is allowed."""
    if isinstance(transition_chunks, bool) or not isinstance(transition_chunks, int):
        raise ValueError(f"transition_chunks must be an integer, got {transition_chunks!r}")
    if not 1 <= transition_chunks <= MAX_TRANSITION_CHUNKS:
        raise ValueError(
            f"transition_chunks={transition_chunks} must be in [1, {MAX_TRANSITION_CHUNKS}] "
            "(1: the new prompt from its first chunk)"
        )
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation {interpolation!r} is unknown; choose one of {list(INTERPOLATIONS)}"
        )


def blend(a: torch.Tensor, b: torch.Tensor, weight: float, interpolation: str) -> torch.Tensor:
    """`a` moved `weight` of the way to `b` (text contexts [..., L, D]), in float32 on their
    device. `slerp` rotates each token vector along the great circle between the two, scaling
    its norm linearly (where a vector is zero, padding, or the two are parallel: linear)."""
    if a.shape != b.shape:
        raise ValueError(f"contexts of shapes {list(a.shape)} and {list(b.shape)} cannot blend")
    check_transition(1, interpolation)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight} must be in [0, 1]")
    x, y = a.float(), b.float()
    if weight == 0.0:
        return x
    if weight == 1.0:
        return y
    linear = torch.lerp(x, y, weight)
    if interpolation == "linear":
        return linear
    na, nb = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    ua, ub = x / na.clamp_min(1e-12), y / nb.clamp_min(1e-12)
    omega = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0).acos()
    sin = omega.sin()
    safe = sin.clamp_min(_PARALLEL)
    direction = ((1 - weight) * omega).sin() / safe * ua + (weight * omega).sin() / safe * ub
    norm = torch.lerp(na, nb, weight)
    spherical = direction * norm
    use_linear = (sin < _PARALLEL) | (na == 0) | (nb == 0)
    return torch.where(use_linear, linear, spherical)


@dataclass(frozen=True)
class PromptChange:
    """A prompt from chunk `from_chunk` on: its text context, reached over `transition_chunks`."""

    from_chunk: int
    context: torch.Tensor
    transition_chunks: int = 1
    interpolation: str = "linear"
    recache: bool = False  # rebuild the caches of the chunks before it under its conditioning

    def __post_init__(self) -> None:
        check_transition(self.transition_chunks, self.interpolation)


def conditioning(changes: Sequence[PromptChange], chunk: int) -> torch.Tensor:
    """The text context chunk `chunk` is generated under. `changes` are in order of
    `from_chunk`, the first from chunk 0; outside a transition the change's own context object
    is returned (callers compare by identity to skip recomputing text K/V)."""
    if not changes or changes[0].from_chunk != 0:
        raise ValueError("a session's prompt changes must start with one from chunk 0")
    current = changes[0].context
    for i, change in enumerate(changes):
        if change.from_chunk > chunk:
            break
        if i and change.from_chunk < changes[i - 1].from_chunk:
            raise ValueError("prompt changes must be in order of their from_chunk")
        nxt = changes[i + 1].from_chunk if i + 1 < len(changes) else None
        # the last chunk under this change that matters: `chunk`, or the one before the next
        last = chunk if nxt is None or nxt > chunk else nxt - 1
        step = last - change.from_chunk + 1
        if i == 0 or step >= change.transition_chunks:
            current = change.context
        elif step > 0:
            w = step / change.transition_chunks
            current = blend(current, change.context, w, change.interpolation)
    return current


class Scheduled(Protocol):
    """Where a change stands in the session (a PromptChange, or its stages.proto message,
    whose transition_chunks 0 means 1)."""

    from_chunk: int
    transition_chunks: int


def in_transition(changes: Sequence[Scheduled], chunk: int) -> bool:
    """Whether chunk `chunk` is conditioned on a blend."""
    live = [c for c in changes if c.from_chunk <= chunk]
    if len(live) < 2:
        return False
    last = live[-1]
    return chunk - last.from_chunk + 1 < last.transition_chunks


def text_changes_at(changes: Sequence[Scheduled], chunk: int) -> bool:
    """Whether chunk `chunk` is conditioned differently from the chunk before it: a change
    starts there, or the chunk before was mid-blend (the blend goes on, or ends)."""
    starts = any(c.from_chunk == chunk for c in changes[1:])
    return starts or (chunk > 0 and in_transition(changes, chunk - 1))


def cache_conditioning(changes: Sequence[PromptChange], chunk: int, done: int) -> torch.Tensor:
    """The text context chunk `chunk`'s cache entries were committed under, once the chunks
    before `done` ran: its own conditioning, unless a re-caching change applied after it (from
    a chunk in (chunk, done]) rebuilt them, the latest such under its first chunk's."""
    recached = [c.from_chunk for c in changes if c.recache and chunk < c.from_chunk <= done]
    return conditioning(changes, max(recached) if recached else chunk)
