"""The stage calls of one session: which message goes to which stage, pinned to the replicas
that hold the session, and releases that complete even while the caller is being cancelled.

Handles are anything with Serve's deployment-handle surface (`options(session_id=...)` and
`Method.remote(request)` returning an awaitable), so the session logic runs unchanged against
in-process fakes in tests.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from histream_model.schedules import plan_chunk
from histream_model.schedules.pipeline import pipelined, split_phases
from histream_model.shape import VideoShape
from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, ReplicaLost, SessionNotHeld, remote_result
from services.logs import ids
from services.protocol import Generation, StageName, StreamKind, session_spec
from services.protocol.routing import own_request_id

if TYPE_CHECKING:
    from services.sessions.record import SessionRecord

log = logging.getLogger("histream.sessions")

ENCODE_ATTEMPTS = 3  # a prompt encoding lost with its replica (or silent) is asked again


@dataclass(frozen=True)
class StageHandles:
    """Deployment handles of the three stages; a call through them unanswered for
    `call_timeout_s` (None: no limit) is taken for lost, like one whose replica died."""

    structure: Any
    refine: Any
    decode: Any
    call_timeout_s: float | None = None
    steps: tuple[Any, ...] = ()  # HiAR's step workers (pipeline_workers), in order

    def __getitem__(self, name: StageName) -> Any:
        if name.worker is not None:
            if name.worker >= len(self.steps):
                raise RuntimeError(f"no {name} deployed (pipeline_workers={len(self.steps)})")
            return self.steps[name.worker]
        return {
            StageName.STRUCTURE: self.structure,
            StageName.REFINE: self.refine,
            StageName.DECODE: self.decode,
        }[name]

    @property
    def step_workers(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class SessionPlan:
    """A validated request: what to generate and for whom."""

    object_id: str  # video id or public session id: where its objects are stored
    kind: StreamKind
    tenant: str
    shape: VideoShape
    seed: int
    prompt: str
    fps: int
    # HiAR's pipeline: the step workers a session of a HiAR mode runs on (0: none deployed);
    # the driver sets it from its handles
    step_workers: int = 0
    endless: bool = False  # started without num_frames: shape.num_frames is its cap

    @property
    def spec_args(self) -> tuple:
        """(tenant, shape, seed, endless): what session_spec reads besides the routing id."""
        return self.tenant, self.shape, self.seed, self.endless

    @classmethod
    def of(
        cls, generation: Generation, object_id: str, kind: StreamKind, tenant: str, fps: int
    ) -> SessionPlan:
        g = generation
        return cls(object_id, kind, tenant, g.shape, g.seed, g.prompt, fps, endless=g.endless)

    def log_ids(self) -> dict:
        """The `extra` of a log line about this session or video (never its prompt)."""
        if self.kind == StreamKind.VIDEO:
            return ids(self.tenant, video_id=self.object_id)
        return ids(self.tenant, session_id=self.object_id)

    @property
    def pipelined(self) -> bool:
        """Whether the session runs on the step workers, as a wavefront."""
        return self.step_workers > 0 and pipelined(self.shape)

    @property
    def denoisers(self) -> tuple[StageName, ...]:
        """The denoising stages that hold this session's caches."""
        if self.pipelined:
            return tuple(StageName.step(w) for w in range(self.step_workers))
        return tuple(StageName.for_resolution(r) for r in self.shape.mode.resolutions)

    @functools.cached_property
    def workers(self) -> list[tuple[int, ...]]:
        """The phase indices each denoiser runs (every chunk's phases split alike), in the
        order of `denoisers`; computed once (every phase call asks)."""
        plan = plan_chunk(self.shape, 0)
        if self.pipelined:
            return split_phases(plan, self.step_workers, self.shape)
        return [
            tuple(i for i, p in enumerate(plan.phases) if p.resolution == name.resolution)
            for name in self.denoisers
        ]

    def stage_for(self, phase_index: int) -> StageName:
        """The denoiser that runs phase `phase_index` of every chunk."""
        for name, phases in zip(self.denoisers, self.workers, strict=True):
            if phase_index in phases:
                return name
        raise ValueError(f"no denoiser runs phase {phase_index}")


@dataclass(frozen=True)
class Opened:
    """What opening on every stage gave back."""

    kv_bytes: int  # cache bytes the denoising stages hold for the session
    init_segment: bytes  # the fMP4 init segment from the decode pool
    # restores: the seconds each stage took to rebuild its share (those that took up the
    # state they kept since the suspend are not in it)
    rebuilt: dict[StageName, float] = field(default_factory=dict)


class SessionStages:
    """Every stage call of one session, under its routing id (the session id stages know)."""

    # Releases in flight: they run detached from the request that started them (see `release`).
    _releases: ClassVar[set[asyncio.Task]] = set()

    def __init__(self, handles: StageHandles, plan: SessionPlan) -> None:
        self.handles = handles
        self.plan = plan
        self.session_id = ""  # chosen at `open`; a new one per attempt
        self.held: list[StageName] = []  # stages that hold the session now
        self._beating: asyncio.Task | None = None

    def _answer(self, response: Any) -> Any:
        return remote_result(response, self.handles.call_timeout_s)

    def _pinned(self, name: StageName) -> Any:
        own_request_id()  # concurrent calls of one request must not share Serve's request id
        return self.handles[name].options(session_id=self.session_id)

    async def call(self, name: StageName, method: str, request: object) -> Any:
        """Any method of a stage, pinned to the session's replica."""
        return await self._answer(getattr(self._pinned(name), method).remote(request))

    async def encode(self, prompt: str) -> stages_pb2.Tensor:
        """The prompt's text context (any structure replica: no session state involved)."""
        request = stages_pb2.EncodePromptRequest(prompt=prompt)
        for attempt in range(ENCODE_ATTEMPTS):  # no session state: safe to ask again
            try:
                own_request_id()
                response = await self._answer(self.handles.structure.EncodePrompt.remote(request))
                break
            except ReplicaLost:
                if attempt == ENCODE_ATTEMPTS - 1:
                    raise
        return response.context

    async def open(self, session_id: str, context: stages_pb2.Tensor) -> Opened:
        """Open on every stage at once. If any refuses, raises (AtCapacity first); the stages
        that did open stay in `held` for `release`."""
        self.session_id = session_id
        plan, shape = self.plan, self.plan.shape
        spec = session_spec(session_id, *plan.spec_args)
        opened = stages_pb2.OpenSessionRequest(spec=spec, context=context)
        stream = stages_pb2.OpenStreamRequest(
            session_id=session_id,
            tenant=plan.tenant,
            preset=shape.preset.name,
            kind=plan.kind.to_proto(),
            width=shape.width,
            height=shape.height,
            fps=plan.fps,
            object_id=plan.object_id,
            endless=plan.endless,
        )
        calls = {name: self._pinned(name).OpenSession.remote(opened) for name in plan.denoisers}
        calls[StageName.DECODE] = self._pinned(StageName.DECODE).OpenStream.remote(stream)
        return await self._admit(calls)

    async def _admit(self, calls: dict[StageName, Any]) -> Opened:
        """Await opening (or restoring) calls on every stage at once. If any refuses, raises
        (AtCapacity first); the stages that did open stay in `held` for `release`."""
        # Counted as held from the moment they are asked: if this call is cancelled while the
        # stages open, `release` still closes every one (a stage refuses a later open then).
        self.held.extend(calls)
        results = await asyncio.gather(*map(self._answer, calls.values()), return_exceptions=True)
        errors, kv_bytes, init, rebuilt = [], 0, b"", {}
        for name, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(result)
                self.held.remove(name)
                continue
            if isinstance(result, stages_pb2.RestoreResponse) and not result.adopted:
                rebuilt[name] = result.seconds
            if name == StageName.DECODE:
                init = result.init_segment
            else:
                kv_bytes += result.kv_bytes
        if errors:
            capacity = [e for e in errors if isinstance(e, AtCapacity)]
            raise capacity[0] if capacity else errors[0]
        return Opened(kv_bytes=kv_bytes, init_segment=init, rebuilt=rebuilt)

    async def resume(self, session_id: str, record: SessionRecord) -> Opened:
        """Take the session up on every stage from `record` (see `open` for failures)."""
        self.session_id = session_id
        request = record.restore(record.decoded, session_id)
        calls = {
            name: self._pinned(name).RestoreSession.remote(request) for name in self.plan.denoisers
        }
        calls[StageName.DECODE] = self._pinned(StageName.DECODE).RestoreStream.remote(request)
        return await self._admit(calls)

    async def run_phase(
        self, chunk: int, phase: int, latents: stages_pb2.Tensor | None
    ) -> stages_pb2.ChunkLatents:
        request = stages_pb2.PhaseRequest(
            session_id=self.session_id, chunk_index=chunk, phase=phase
        )
        if latents is not None:
            request.latents.CopyFrom(latents)
        stage = self._pinned(self.plan.stage_for(phase))
        return await self._answer(stage.RunPhase.remote(request))

    async def set_prompt(self, context: stages_pb2.Tensor) -> None:
        request = stages_pb2.SetPromptRequest(session_id=self.session_id, context=context)
        stages = [self._pinned(name).SetPrompt.remote(request) for name in self.plan.denoisers]
        await asyncio.gather(*map(self._answer, stages))

    async def decode(self, latents: stages_pb2.ChunkLatents) -> stages_pb2.DecodedSegment:
        return await self._answer(self._pinned(StageName.DECODE).DecodeChunk.remote(latents))

    async def finish(self, video: stages_pb2.VideoMetadata | None) -> int:
        """Seal the media on the decode pool (which then no longer holds the session); returns
        the number of frames."""
        request = stages_pb2.FinishStreamRequest(session_id=self.session_id, video=video)
        response = await self._answer(self._pinned(StageName.DECODE).FinishStream.remote(request))
        if StageName.DECODE in self.held:
            self.held.remove(StageName.DECODE)
        return response.num_frames

    def beat(self, interval_s: float) -> None:
        """Touch the stages every `interval_s` while they hold the session."""
        if self._beating is None or self._beating.done():
            self._beating = asyncio.get_running_loop().create_task(self._beat(interval_s))

    async def _beat(self, interval_s: float) -> None:
        while self.held:
            await asyncio.sleep(interval_s)
            await self.touch()

    async def touch(self) -> None:
        """Tell every stage holding the session that its driver is alive (never raises: a
        stage that lost the session finds out on the next real call and is restored then)."""
        request = stages_pb2.ReleaseRequest(session_id=self.session_id)
        calls = [self.call(name, "Touch", request) for name in list(self.held)]
        await asyncio.gather(*calls, return_exceptions=True)

    async def release(
        self, names: list[StageName] | None = None, suspend: bool = False, keep_s: float = 0.0
    ) -> None:
        """Free the session on the named stages (default: every stage holding it). Never raises.
        `suspend`: the session goes on later from its snapshot, so its media stays open; the
        stages keep its state `keep_s` more seconds for a resume to take up.

        Serve cancels a request's downstream calls when its client goes away; the close calls
        therefore run in a task with a fresh context (no parent request), shielded, so they
        complete even while the caller is being cancelled.
        """
        names = [n for n in (self.held if names is None else names) if n in self.held]
        for name in names:
            self.held.remove(name)
        if not self.held and self._beating is not None:
            self._beating.cancel()
        if not names:
            return
        task = asyncio.get_running_loop().create_task(
            self._close_calls(names, suspend, keep_s), context=contextvars.Context()
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        await asyncio.shield(task)

    async def _close_calls(self, names: list[StageName], suspend: bool, keep_s: float) -> None:
        request = stages_pb2.ReleaseRequest(
            session_id=self.session_id, suspend=suspend, keep_s=keep_s
        )
        calls = []
        for name in names:
            stage = self._pinned(name)
            method = stage.CloseStream if name == StageName.DECODE else stage.CloseSession
            calls.append(self._answer(method.remote(request)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, SessionNotHeld):
                log.warning("closing %s on %s failed: %s", self.session_id, name, result)
