"""In-process stand-ins for Serve deployment handles, for tests without Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos.histream.v1 import stages_pb2
from services.errors import SessionNotHeld
from services.sessions import StageHandles


class LocalHandle:
    """Serve's deployment-handle surface over an object in this process.

    `options(session_id=...)` pins (the id is recorded with each call); `Method.remote(request)`
    returns what the method returns (a coroutine for the stages' async RPCs), so awaiting it is
    awaiting the call, as with a `DeploymentResponse`.
    """

    def __init__(
        self,
        target: Any,
        calls: list | None = None,
        session_id: str | None = None,
        detached: bool = False,
    ):
        self.target = target
        self.calls: list[tuple[str, str | None, tuple]] = [] if calls is None else calls
        self.session_id = session_id
        # like a replica: the call runs on when its caller is cancelled
        self.detached = detached

    def options(self, session_id: str | None = None, **_: object) -> LocalHandle:
        return LocalHandle(self.target, self.calls, session_id, self.detached)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)
        handle = self

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                handle.calls.append((name, handle.session_id, args))
                result = method(*args)
                if not asyncio.iscoroutine(result):  # a sync method (stats): awaitable too
                    return Answered(result)
                if handle.detached:
                    return asyncio.shield(asyncio.ensure_future(result))
                return result

        return Remote

    def called(self, name: str) -> list[tuple]:
        """The requests of every call of `name`, in order."""
        return [args for method, _, args in self.calls if method == name]


class Answered:
    """A sync method's result, awaitable like a `DeploymentResponse`."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator: `await` gets the value at once


# -- scripted stages -------------------------------------------------------------------------------
#
# Tests of the session driver and the job runner script the stages: calls can be held at a gate
# (an asyncio.Event) or made to fail, and every call is written to one journal shared by the
# stages of a test, in the order it happened, so tests wait for conditions over it (no sleeps)
# and check orderings across stages after the fact.

Hook = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class Entry:
    """One step of one stage call: "enter", "exit", "raise" or "cancel"."""

    stage: str
    method: str
    what: str
    request: Any

    @property
    def chunk(self) -> int | None:
        return getattr(self.request, "chunk_index", None)

    @property
    def session_id(self) -> str:
        spec = getattr(self.request, "spec", None)
        return spec.session_id if spec is not None else getattr(self.request, "session_id", "")


class Journal:
    """Every stage call of a test in order, and waiting for a condition over them."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._waiting: list[tuple[Callable[[], bool], asyncio.Future]] = []

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.notify()

    def notify(self) -> None:
        """Re-check what tests wait for (also call it after changing state they look at)."""
        for item in list(self._waiting):
            check, future = item
            if future.done() or check():
                if not future.done():
                    future.set_result(None)
                self._waiting.remove(item)

    async def until(self, check: Callable[[], bool]) -> None:
        if check():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((check, future))
        await future

    def find(
        self,
        method: str | None = None,
        stage: str | None = None,
        what: str = "enter",
        chunk: int | None = None,
        session_id: str | None = None,
    ) -> list[Entry]:
        return [
            e
            for e in self.entries
            if (method is None or e.method == method)
            and (stage is None or e.stage == stage)
            and e.what == what
            and (chunk is None or e.chunk == chunk)
            and (session_id is None or e.session_id == session_id)
        ]

    def position(self, method: str, what: str = "enter", **match: Any) -> int:
        """Index in `entries` of the first matching entry (ValueError if none)."""
        first = self.find(method, what=what, **match)
        if not first:
            raise ValueError(f"no {what} of {method} {match} in the journal")
        return self.entries.index(first[0])

    async def reached(self, method: str, what: str = "enter", **match: Any) -> Entry:
        await self.until(lambda: bool(self.find(method, what=what, **match)))
        return self.find(method, what=what, **match)[0]


class Scripted:
    """Journaling, gates and failures around a stage's RPCs."""

    def __init__(self, name: str, journal: Journal) -> None:
        self.name = name
        self.journal = journal
        self.hooks: dict[str, list[Hook]] = {}

    async def _call(self, method: str, request: Any, run: Callable[[Any], Awaitable[Any]]) -> Any:
        journal = self.journal
        journal.add(Entry(self.name, method, "enter", request))
        try:
            for hook in self.hooks.get(method, []):
                await hook(request)
            result = await run(request)
        except asyncio.CancelledError:
            journal.add(Entry(self.name, method, "cancel", request))
            raise
        except BaseException:
            journal.add(Entry(self.name, method, "raise", request))
            raise
        journal.add(Entry(self.name, method, "exit", request))
        return result

    def gate(self, method: str, when: Callable[[Any], bool] = lambda _: True) -> asyncio.Event:
        """Calls of `method` matching `when` wait for the returned event."""
        event = asyncio.Event()

        async def wait(request: Any) -> None:
            if when(request):
                await event.wait()

        self.hooks.setdefault(method, []).append(wait)
        return event

    def fail(
        self,
        method: str,
        error: Callable[[], BaseException],
        when: Callable[[Any], bool] = lambda _: True,
        times: int | None = None,
    ) -> None:
        """Calls of `method` matching `when` raise `error()` (the first `times` of them)."""
        raised = [0]

        async def raise_(request: Any) -> None:
            if when(request) and (times is None or raised[0] < times):
                raised[0] += 1
                raise error()

        self.hooks.setdefault(method, []).append(raise_)


class Hooked(Scripted):
    """A real stage object behind the journal, gates and failures."""

    def __init__(self, target: Any, name: str, journal: Journal) -> None:
        super().__init__(name, journal)
        self.target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)
        if not name[:1].isupper():  # stats() and the like
            return method

        async def call(request: Any) -> Any:
            return await self._call(name, request, method)

        return call


def tensor_of(text: str) -> stages_pb2.Tensor:
    data = text.encode()
    return stages_pb2.Tensor(dtype="uint8", shape=[len(data)], data=data)


def frames_of(chunk: int) -> int:
    """Video frames a chunk decodes to at the tiny preset (3 latent frames a chunk)."""
    return 9 if chunk == 0 else 12


class FakeStage(Scripted):
    """Every RPC of the stage protocol with no model, answering at once unless scripted.

    A session holds the prompt it conditions on; a phase's latents are the bytes
    "{chunk}/{phase}/{prompt}", so a test sees which prompt each chunk was generated under.
    """

    def __init__(self, name: str, journal: Journal) -> None:
        super().__init__(name, journal)
        self.sessions: dict[str, str] = {}  # session id -> its prompt (denoisers) or ""
        self.frames: dict[str, int] = {}

    def stats(self) -> dict:
        return {"sessions": len(self.sessions)}

    def _held(self, session_id: str) -> str:
        if session_id not in self.sessions:
            raise SessionNotHeld(f"{self.name} does not hold session {session_id!r}")
        return self.sessions[session_id]

    def _open(self, session_id: str, prompt: str) -> None:
        if session_id in self.sessions:
            raise AssertionError(f"{self.name}: session {session_id!r} opened twice")
        self.sessions[session_id] = prompt
        self.frames[session_id] = 0

    async def EncodePrompt(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            return stages_pb2.EncodePromptResponse(context=tensor_of(r.prompt))

        return await self._call("EncodePrompt", request, run)

    async def OpenSession(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._open(r.spec.session_id, r.context.data.decode())
            return stages_pb2.OpenSessionResponse(session_id=r.spec.session_id, kv_bytes=1000)

        return await self._call("OpenSession", request, run)

    async def RunPhase(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            prompt = self._held(r.session_id)
            latents = tensor_of(f"{r.chunk_index}/{r.phase}/{prompt}")
            return stages_pb2.ChunkLatents(
                session_id=r.session_id, chunk_index=r.chunk_index, latents=latents
            )

        return await self._call("RunPhase", request, run)

    async def SetPrompt(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._held(r.session_id)
            self.sessions[r.session_id] = r.context.data.decode()
            return stages_pb2.StageAck(session_id=r.session_id)

        return await self._call("SetPrompt", request, run)

    async def Touch(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._held(r.session_id)
            return stages_pb2.StageAck(session_id=r.session_id)

        return await self._call("Touch", request, run)

    async def CloseSession(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self.sessions.pop(r.session_id, None)
            return stages_pb2.StageAck(session_id=r.session_id)

        return await self._call("CloseSession", request, run)

    async def OpenStream(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._open(r.session_id, "")
            return stages_pb2.OpenStreamResponse(session_id=r.session_id, init_segment=b"init")

        return await self._call("OpenStream", request, run)

    async def DecodeChunk(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._held(r.session_id)
            first, n = self.frames[r.session_id], frames_of(r.chunk_index)
            self.frames[r.session_id] += n
            return stages_pb2.DecodedSegment(
                session_id=r.session_id,
                chunk_index=r.chunk_index,
                first_frame=first,
                num_frames=n,
                data=b"seg:" + r.latents.data,
            )

        return await self._call("DecodeChunk", request, run)

    async def FinishStream(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self._held(r.session_id)
            self.sessions.pop(r.session_id)
            frames = self.frames.pop(r.session_id)
            return stages_pb2.FinishStreamResponse(session_id=r.session_id, num_frames=frames)

        return await self._call("FinishStream", request, run)

    async def CloseStream(self, request: Any) -> Any:
        async def run(r: Any) -> Any:
            self.sessions.pop(r.session_id, None)
            return stages_pb2.StageAck(session_id=r.session_id)

        return await self._call("CloseStream", request, run)


@dataclass
class Stages:
    """Three stages behind `LocalHandle`s sharing one journal; `handles` goes to the driver."""

    structure: Any  # FakeStage or Hooked
    refine: Any
    decode: Any
    journal: Journal
    structure_handle: LocalHandle | None = None  # when the refine stage already holds one
    handles: StageHandles = field(init=False)

    def __post_init__(self) -> None:
        self.handles = StageHandles(
            structure=self.structure_handle or LocalHandle(self.structure),
            refine=LocalHandle(self.refine),
            decode=LocalHandle(self.decode),
        )

    def calls(self) -> list[tuple[str, str, str | None, tuple]]:
        """(stage, method, routing session id, args) of every call through the handles."""
        return [
            (stage, method, routing, args)
            for stage in ("structure", "refine", "decode")
            for method, routing, args in getattr(self.handles, stage).calls
        ]

    def held(self) -> dict[str, int]:
        """Sessions each stage holds now."""
        return {s: getattr(self, s).stats()["sessions"] for s in ("structure", "refine", "decode")}


def fake_stages() -> Stages:
    journal = Journal()
    names = ("structure", "refine", "decode")
    return Stages(*(FakeStage(name, journal) for name in names), journal)


def real_stages(store: Path, max_sessions: int = 4, window: int = 60) -> Stages:
    """The real structure, refine and decode stages in this process (tiny preset, no Ray), each
    behind `Hooked` so tests can gate them; the refine stage reaches the structure stage through
    the driver's recording handle, so its hand-offs are recorded too."""
    from services.settings import ServeSettings
    from services.stages import DecodeStage, RefineStage, StructureStage
    from services.storage import StorageSettings

    settings = ServeSettings(
        preset="tiny",
        max_sessions_per_replica=max_sessions,
        storage=StorageSettings(local_dir=str(store)),
        hls_window_segments=window,  # endless sessions' live playlist window
    )
    journal = Journal()
    structure = Hooked(StructureStage(settings), "structure", journal)
    to_structure = LocalHandle(structure)
    refine = Hooked(RefineStage(settings, to_structure), "refine", journal)
    decode = Hooked(DecodeStage(settings), "decode", journal)
    return Stages(structure, refine, decode, journal, structure_handle=to_structure)
