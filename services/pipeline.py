"""Driving one session through the stages: the distributed form of Algorithm 1's outer loop.

For each chunk: the structure stage's low-res steps, then the refine stage's high-res steps and
dual-cache commit, then the decode pool. Decoding chunk i overlaps denoising chunk i + 1 (the
denoisers never wait for the VAE); decode calls of one session stay in order. Every stage call
carries the session id as its routing key, so it reaches the replica holding that session.

Video jobs and streaming sessions use the same driver; only what they do with the chunks differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

from histream_model.config import VideoShape, get_mode
from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, InvalidArgument, ServiceError, SessionNotHeld, unwrap
from services.tensors import digest

log = logging.getLogger("histream.pipeline")


@dataclass(frozen=True)
class StageHandles:
    """Deployment handles of the three stages."""

    structure: object
    refine: object
    decode: object


@dataclass(frozen=True)
class SessionPlan:
    """A validated request: what to generate and for whom."""

    object_id: str  # video id or public session id: where its objects are stored
    kind: str  # "video" or "session"
    tenant: str
    shape: VideoShape
    seed: int
    prompt: str
    fps: int


@dataclass(frozen=True)
class ChunkEvent:
    """One decoded chunk, in order."""

    index: int
    first_frame: int
    num_frames: int
    segment: bytes  # fMP4 media segment
    object_key: str  # where the decode pool stored it ("" for video jobs)
    prompt_version: int  # which prompt the chunk was generated under
    latents: stages_pb2.Tensor  # the chunk's clean high-res latents, exact bytes
    latents_sha256: str
    denoise_seconds: float  # structure + refine wall time for the chunk
    decode_seconds: float
    kv_bytes: int  # cache bytes the session holds on the denoisers


@dataclass
class _PendingPrompt:
    context: stages_pb2.Tensor
    version: int
    applied: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


async def call(response) -> object:
    """Await a handle call, re-raising the service error it carried."""
    try:
        return await response
    except Exception as err:
        cause = unwrap(err)
        if cause is not err and isinstance(cause, ServiceError):
            raise cause from None
        raise


class SessionDriver:
    """Opens, runs and closes one session across the stage deployments."""

    lookahead = 2  # chunks denoised ahead of the slowest consumer
    # Cleanups in flight: they run detached from the request that started them (see `close`).
    _cleanups: ClassVar[set[asyncio.Task]] = set()

    def __init__(self, handles: StageHandles, plan: SessionPlan) -> None:
        self.handles = handles
        self.plan = plan
        self.session_id = ""  # routing id, chosen at open (a new one per capacity retry)
        self.kv_bytes = 0
        self.init_segment = b""
        self.prompt_version = 0  # versions handed out to prompt updates
        self.applied_version = 0  # the version the stages currently condition on
        self.next_chunk = 0  # first chunk whose denoising has not started
        self._context: stages_pb2.Tensor | None = None
        self._pending: _PendingPrompt | None = None
        self._opened: list[str] = []
        self.first_chunk_seconds: float | None = None

    @property
    def cache_bytes(self) -> int:
        """KV bytes the denoising stages hold for this session right now."""
        return self.kv_bytes if any(n != "decode" for n in self._opened) else 0

    @property
    def dual(self) -> bool:
        return self.plan.shape.mode.dual_resolution

    def _pinned(self, handle):
        return handle.options(session_id=self.session_id)

    def _spec(self) -> stages_pb2.SessionSpec:
        s = self.plan.shape
        return stages_pb2.SessionSpec(
            session_id=self.session_id,
            tenant=self.plan.tenant,
            preset=s.preset.name,
            mode=s.mode.name,
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            seed=self.plan.seed,
        )

    async def encode(self, prompt: str) -> stages_pb2.Tensor:
        request = stages_pb2.EncodePromptRequest(prompt=prompt)
        response = await call(self.handles.structure.EncodePrompt.remote(request))
        return response.context

    async def open(self, deadline_s: float = 600.0) -> None:
        """Encode the prompt and open the session on every stage, waiting for capacity.

        A replica at capacity is answered by trying again under a new routing id (another
        replica, most likely), with backoff, until `deadline_s` has passed.
        """
        self._context = await self.encode(self.plan.prompt)
        started, delay = time.monotonic(), 0.05
        while True:
            self.session_id = f"{self.plan.object_id}.{uuid.uuid4().hex[:8]}"
            try:
                await self._open_once()
                return
            except AtCapacity:
                await self.close()
                if time.monotonic() - started > deadline_s:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _open_once(self) -> None:
        opened = stages_pb2.OpenSessionRequest(spec=self._spec(), context=self._context)
        s = self.plan.shape
        calls = {
            "refine": self._pinned(self.handles.refine).OpenSession.remote(opened),
            "decode": self._pinned(self.handles.decode).OpenStream.remote(
                stages_pb2.OpenStreamRequest(
                    session_id=self.session_id,
                    tenant=self.plan.tenant,
                    preset=s.preset.name,
                    kind=self.plan.kind,
                    width=s.width,
                    height=s.height,
                    fps=self.plan.fps,
                    object_id=self.plan.object_id,
                )
            ),
        }
        if self.dual:
            calls["structure"] = self._pinned(self.handles.structure).OpenSession.remote(opened)
        results = await asyncio.gather(*(call(c) for c in calls.values()), return_exceptions=True)
        errors = []
        for name, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                self._opened.append(name)
                if name == "decode":
                    self.init_segment = result.init_segment
                else:
                    self.kv_bytes += result.kv_bytes
        if errors:
            capacity = [e for e in errors if isinstance(e, AtCapacity)]
            raise capacity[0] if capacity else errors[0]

    async def update_prompt(self, prompt: str) -> tuple[int, int]:
        """Queue a new prompt; returns (its version, the chunk it applies from)."""
        if self.next_chunk >= self.plan.shape.num_chunks:
            raise InvalidArgument(
                f"all {self.plan.shape.num_chunks} chunks are already generated; "
                "no chunk is left to apply a new prompt to",
                param="prompt",
            )
        context = await self.encode(prompt)
        previous = self._pending
        self.prompt_version += 1
        self._pending = _PendingPrompt(context=context, version=self.prompt_version)
        if previous is not None and not previous.applied.done():
            self._pending.applied = previous.applied  # superseded: resolve both together
        return await asyncio.shield(self._pending.applied)

    async def _apply_prompt(self, chunk: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        request = stages_pb2.SetPromptRequest(session_id=self.session_id, context=pending.context)
        stages = [self.handles.refine] + ([self.handles.structure] if self.dual else [])
        await asyncio.gather(*(call(self._pinned(h).SetPrompt.remote(request)) for h in stages))
        self.applied_version = pending.version
        if not pending.applied.done():
            pending.applied.set_result((pending.version, chunk))

    async def _denoise(self, index: int) -> tuple[stages_pb2.ChunkLatents, float]:
        started = time.perf_counter()
        request = stages_pb2.ChunkLatents(session_id=self.session_id, chunk_index=index)
        if self.dual:
            low = await call(
                self._pinned(self.handles.structure).LowSteps.remote(
                    stages_pb2.ChunkRequest(session_id=self.session_id, chunk_index=index)
                )
            )
            request.latents.CopyFrom(low.latents)
        out = await call(self._pinned(self.handles.refine).Refine.remote(request))
        return out, time.perf_counter() - started

    async def _decode(
        self,
        out: stages_pb2.ChunkLatents,
        previous: asyncio.Task | None,
        version: int,
        denoise_s: float,
    ) -> ChunkEvent:
        if previous is not None:
            await previous  # decode calls of a session stay in chunk order
        seg = await call(self._pinned(self.handles.decode).DecodeChunk.remote(out))
        return ChunkEvent(
            index=out.chunk_index,
            first_frame=seg.first_frame,
            num_frames=seg.num_frames,
            segment=seg.data,
            object_key=seg.object_key,
            prompt_version=version,
            latents=out.latents,
            latents_sha256=digest(out.latents),
            denoise_seconds=denoise_s,
            decode_seconds=seg.decode_seconds + seg.encode_seconds,
            kv_bytes=self.kv_bytes,
        )

    async def chunks(self) -> AsyncIterator[ChunkEvent]:
        """Generate every chunk; yields decoded chunks in order as soon as each is ready."""
        started = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.lookahead)
        decodes: list[asyncio.Task] = []

        async def produce() -> None:
            previous = None
            try:
                for index in range(self.plan.shape.num_chunks):
                    await self._apply_prompt(index)
                    self.next_chunk = index + 1
                    version = self.applied_version
                    out, denoise_s = await self._denoise(index)
                    task = asyncio.create_task(self._decode(out, previous, version, denoise_s))
                    decodes.append(task)
                    previous = task
                    await queue.put(task)
                await self._release_denoisers()  # caches are not needed past the last chunk
                await queue.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as err:
                await queue.put(err)

        producer = asyncio.create_task(produce())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                event = await item
                if self.first_chunk_seconds is None:
                    self.first_chunk_seconds = time.perf_counter() - started
                yield event
        finally:
            producer.cancel()
            for task in decodes:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(producer, *decodes, return_exceptions=True)
            if self._pending is not None and not self._pending.applied.done():
                self._pending.applied.set_exception(
                    InvalidArgument("the session ended before the new prompt could apply")
                )

    async def finish(self, manifest: dict | None = None) -> dict:
        """Seal the media (an MP4 + manifest for videos, ENDLIST for sessions) and free all."""
        request = stages_pb2.FinishStreamRequest(
            session_id=self.session_id, manifest_json=json.dumps(manifest or {})
        )
        response = await call(self._pinned(self.handles.decode).FinishStream.remote(request))
        if "decode" in self._opened:
            self._opened.remove("decode")
        await self.close()
        return json.loads(response.manifest_json or "{}")

    async def _release_denoisers(self) -> None:
        await self._release([n for n in self._opened if n != "decode"])

    async def close(self) -> None:
        """Free the session on every stage that holds it (idempotent, never raises)."""
        await self._release(list(self._opened))

    async def _release(self, names: list[str]) -> None:
        """Close the session on the named stages.

        Serve cancels a request's downstream calls when its client goes away; the close calls
        therefore run in a task with a fresh context (no parent request), shielded, so they
        complete even while the caller is being cancelled.
        """
        for name in names:
            self._opened.remove(name)
        if not names:
            return
        task = asyncio.get_running_loop().create_task(
            self._close_calls(names), context=contextvars.Context()
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def _close_calls(self, names: list[str]) -> None:
        request = stages_pb2.ReleaseRequest(session_id=self.session_id)
        calls = []
        for name in names:
            handle = self._pinned(getattr(self.handles, name))
            method = handle.CloseStream if name == "decode" else handle.CloseSession
            calls.append(call(method.remote(request)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, SessionNotHeld):
                log.warning("closing %s on %s failed: %s", self.session_id, name, result)


def shape_for(preset, mode: str, height: int, width: int, num_frames: int) -> VideoShape:
    try:
        return VideoShape(preset, get_mode(mode), height, width, num_frames)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
