"""A session's prompt updates: each accepted update gets the next version; the newest one still
waiting applies from the next chunk whose denoising has not started, and updates it superseded
are answered with it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument

if TYPE_CHECKING:
    from services.sessions.record import SessionRecord


@dataclass(frozen=True)
class PromptUpdate:
    """A new prompt as a client asks for it (checked): blended in over `transition_chunks`
    chunks, linearly or by slerp (histream_model.conditioning)."""

    text: str
    transition_chunks: int = 1
    interpolation: str = "linear"
    recache: bool = False  # rebuild the window's caches under it (histream_model.conditioning)


@dataclass
class PendingPrompt:
    context: stages_pb2.Tensor  # the encoded prompt
    version: int
    text: str  # the prompt itself (a restore on another replica re-encodes nothing)
    transition_chunks: int = 1
    interpolation: str = "linear"
    recache: bool = False
    # resolves to (version, first chunk generated under it) once the stages condition on it
    applied: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class PromptVersions:
    """Versions handed out, the one waiting, the one the stages condition on."""

    def __init__(self) -> None:
        self.issued = 0  # versions handed out to updates (0 is the opening prompt)
        self.current = 0  # the version the stages condition on now
        self.closed = False  # no chunk is left to apply an update to
        self._pending: PendingPrompt | None = None

    def submit(self, context: stages_pb2.Tensor, update: PromptUpdate | str = "") -> asyncio.Future:
        """Queue a new prompt; the future gives (its version, the chunk it applies from)."""
        if self.closed:
            raise too_late()
        if isinstance(update, str):
            update = PromptUpdate(update)
        previous = self._pending
        self.issued += 1
        self._pending = PendingPrompt(
            context, self.issued, update.text, update.transition_chunks, update.interpolation,
            update.recache,
        )  # fmt: skip
        if previous is not None and not previous.applied.done():
            self._pending.applied = previous.applied  # superseded: both resolve together
        return self._pending.applied

    def take_up(self, record: SessionRecord) -> None:
        """Go on from a record (a resume): the versions it handed out, the one its next chunk is
        under; a change recorded for a later chunk (that chunk was never delivered) waits to
        apply again, from the next chunk."""
        if len(record.contexts) < len(record.prompts):
            raise ValueError("a record's prompts need their contexts to be taken up")
        start = record.decoded
        keep = [i for i, p in enumerate(record.prompts) if p.from_chunk <= start]
        later = [i for i, p in enumerate(record.prompts) if p.from_chunk > start]
        self.issued = max((p.version for p in record.prompts), default=0)
        self.current = record.prompt_version(start) if keep else 0
        if later:
            change = record.prompts[later[-1]]
            self._pending = PendingPrompt(
                record.contexts[later[-1]], change.version, change.prompt,
                change.transition_chunks or 1, change.interpolation or "linear", change.recache,
            )  # fmt: skip
        record.prompts = [record.prompts[i] for i in keep]
        record.contexts = [record.contexts[i] for i in keep]
        record.denoised = start

    @property
    def pending(self) -> bool:
        """Whether an update waits to apply before the next chunk."""
        return self._pending is not None

    def take(self) -> PendingPrompt | None:
        """The prompt to apply before the next chunk, if one is waiting."""
        pending, self._pending = self._pending, None
        return pending

    def applied(self, pending: PendingPrompt, chunk: int) -> None:
        self.current = pending.version
        if not pending.applied.done():
            pending.applied.set_result((pending.version, chunk))

    def failed(self, pending: PendingPrompt, err: BaseException) -> None:
        """Applying `pending` failed: its callers hear why."""
        if not pending.applied.done():
            pending.applied.set_exception(err)

    def abandon(self) -> None:
        """The session's chunks ended: refuse further updates, tell a waiting one's caller."""
        self.closed = True
        if self._pending is not None:
            self.failed(self._pending, too_late())


def too_late() -> InvalidArgument:
    """The answer to an update that no chunk is left to apply to."""
    return InvalidArgument("the session ended before the new prompt could apply", param="prompt")
