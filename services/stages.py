"""The pipeline's stages as Ray Serve deployment classes.

Each class implements its `stages.proto` service: methods named after the RPCs take and return
the protobuf messages. Callers reach them through deployment handles routed by session id
(consistent hashing), so every request of a session lands on the replica holding its state; a
replica asked about a session it does not hold answers `SessionNotHeld`.

Model work runs in a worker thread (`asyncio.to_thread`) so a replica keeps answering other
sessions' small requests and health checks while one session computes; torch releases the GIL
inside its kernels. One session's requests are sequential by protocol.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import torch
from ray import serve

from histream_model.components import dit_for, text_encoder_for, vae_for
from histream_model.config import VideoShape
from histream_model.generator import (
    ResolutionState,
    commit_high,
    commit_low,
    downsample,
    high_steps,
    low_steps,
    new_resolution_state,
    plan_chunk,
    upsample,
)
from histream_model.text import check_prompt
from histream_model.vae import VAEDecodeState
from protos.histream.v1 import stages_pb2
from services.errors import AtCapacity, InvalidArgument, SessionNotHeld
from services.media import FragmentedMp4Encoder
from services.pipeline import shape_for
from services.publish import Layout, SessionWriter, publish_video
from services.settings import ServeSettings
from services.storage import open_storage
from services.tensors import from_proto, to_proto

log = logging.getLogger("histream.stages")
T = TypeVar("T")


def rpc(method: Callable) -> Callable:
    """Count calls of a stage RPC per replica (`stats()`), e.g. to show bad input stops earlier."""

    @functools.wraps(method)
    async def counted(self, *args, **kwargs):
        self.calls[method.__name__] = self.calls.get(method.__name__, 0) + 1
        return await method(self, *args, **kwargs)

    return counted


def replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (direct use in tests)
        return "local"


class SessionTable(Generic[T]):
    """The sessions one replica holds, bounded by its admission limit, with last-use times."""

    def __init__(
        self, stage: str, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stage = stage
        self.capacity = capacity
        self.clock = clock
        self._items: dict[str, T] = {}
        self._used: dict[str, float] = {}

    def check_room(self, session_id: str) -> None:
        """Fail fast, before any work, when `session_id` could not be added."""
        if session_id in self._items:
            raise InvalidArgument(f"session {session_id!r} is already open on this {self.stage}")
        if len(self._items) >= self.capacity:
            raise AtCapacity(
                f"{self.stage} replica {replica_name()} holds {len(self._items)} sessions, "
                f"its limit (max_sessions_per_replica={self.capacity}); retry later"
            )

    def add(self, session_id: str, item: T) -> None:
        self.check_room(session_id)
        self._items[session_id] = item
        self._used[session_id] = self.clock()

    def get(self, session_id: str) -> T:
        item = self._items.get(session_id)
        if item is None:
            raise SessionNotHeld(
                f"{self.stage} replica {replica_name()} does not hold session {session_id!r} "
                "(never opened here, closed, idle too long, or moved by a replica change)"
            )
        self._used[session_id] = self.clock()
        return item

    def pop(self, session_id: str) -> T | None:
        self._used.pop(session_id, None)
        return self._items.pop(session_id, None)

    def idle(self, timeout_s: float) -> list[str]:
        """Sessions not used for longer than `timeout_s`."""
        now = self.clock()
        return [sid for sid, used in self._used.items() if now - used > timeout_s]

    def values(self) -> list[T]:
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class _SessionStage(Generic[T]):
    """What every stage shares: its session table, call counts and the idle-session reaper.

    A session whose client and gateway both vanished (a crashed gateway, a lost network) is
    freed after `session_idle_timeout_s` without requests, so its memory is never lost.
    """

    stage = "stage"

    def __init__(self, settings: ServeSettings) -> None:
        settings.apply_threads()
        self.settings = settings
        self.sessions: SessionTable[T] = SessionTable(self.stage, settings.max_sessions_per_replica)
        self.calls: dict[str, int] = {}
        self._reaper: asyncio.Task | None = None

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        timeout = self.settings.session_idle_timeout_s
        while True:
            await asyncio.sleep(max(0.5, timeout / 4))
            self.reap()

    def reap(self) -> list[str]:
        """Free every session idle for longer than the timeout; returns their ids."""
        expired = self.sessions.idle(self.settings.session_idle_timeout_s)
        for session_id in expired:
            log.warning("%s freed idle session %s", self.stage, session_id)
            self._drop(session_id)
        return expired

    def _drop(self, session_id: str) -> None:
        self.sessions.pop(session_id)


@dataclass
class DenoiseSession:
    """One stage's share of a session: its shape, seed and one resolution's state."""

    shape: VideoShape
    seed: int
    state: ResolutionState
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _DenoiseStage(_SessionStage[DenoiseSession]):
    """What the structure and refine stages share: the DiT and per-session caches."""

    resolution = "high"

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        preset = settings.get_preset()
        self.weights = settings.weight_paths()
        self.model = dit_for(preset, self.weights, settings.device, settings.torch_dtype())
        self.preset = replace(preset, dit=self.model.config)

    def _kv_bytes(self) -> int:
        return sum(s.state.cache.nbytes for s in self.sessions.values())

    async def _compute(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    @rpc
    async def OpenSession(
        self, request: stages_pb2.OpenSessionRequest
    ) -> stages_pb2.OpenSessionResponse:
        spec = request.spec
        shape = shape_for(self.preset, spec.mode, spec.height, spec.width, spec.num_frames)
        context = from_proto(request.context)

        def build() -> ResolutionState:
            with torch.no_grad():
                return new_resolution_state(self.model, shape, self.resolution, context)

        self._start_reaper()
        self.sessions.check_room(spec.session_id)
        state = await self._compute(build)
        self.sessions.add(spec.session_id, DenoiseSession(shape, spec.seed, state))
        log.info("%s opened session %s (%d bytes)", self.stage, spec.session_id, state.cache.nbytes)
        return stages_pb2.OpenSessionResponse(
            session_id=spec.session_id, kv_bytes=state.cache.nbytes, num_chunks=shape.num_chunks
        )

    @rpc
    async def SetPrompt(self, request: stages_pb2.SetPromptRequest) -> stages_pb2.StageAck:
        session = self.sessions.get(request.session_id)
        context = from_proto(request.context)

        def encode() -> None:
            with torch.no_grad():
                weight = self.model.patch_embedding.weight
                session.state.text = self.model.text_kv(context.to(weight.device))

        async with session.lock:
            await self._compute(encode)
        return stages_pb2.StageAck(
            session_id=request.session_id, kv_bytes=session.state.cache.nbytes
        )

    @rpc
    async def CloseSession(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        session = self.sessions.pop(request.session_id)
        freed = session.state.cache.nbytes if session else 0
        return stages_pb2.StageAck(session_id=request.session_id, kv_bytes=freed)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.stage} has no model")

    def stats(self) -> dict:
        """Sessions and cache bytes held, RPC calls served (this replica)."""
        return {"sessions": len(self.sessions), "kv_bytes": self._kv_bytes(), "calls": self.calls}


class StructureStage(_DenoiseStage):
    """Low-res structure steps; holds KV_low per session and the text encoder."""

    stage = "structure stage"
    resolution = "low"

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        self.text = text_encoder_for(
            self.preset, self.weights, settings.device, settings.torch_dtype()
        )

    @rpc
    async def EncodePrompt(
        self, request: stages_pb2.EncodePromptRequest
    ) -> stages_pb2.EncodePromptResponse:
        try:
            prompt = check_prompt(request.prompt, self.settings.max_prompt_chars)
        except ValueError as err:
            raise InvalidArgument(str(err), param="prompt") from None
        context = await self._compute(lambda: self.text.encode([prompt]))
        return stages_pb2.EncodePromptResponse(context=to_proto(context.float()))

    @rpc
    async def LowSteps(self, request: stages_pb2.ChunkRequest) -> stages_pb2.ChunkLatents:
        session = self.sessions.get(request.session_id)
        plan = plan_chunk(session.shape, request.chunk_index)
        options = session.shape.preset.options

        def run() -> torch.Tensor:
            return low_steps(self.model, session.state, plan, options, session.seed)

        async with session.lock:
            started, before = time.perf_counter(), session.state.denoise_passes
            x0_low = await self._compute(run)
        return stages_pb2.ChunkLatents(
            session_id=request.session_id,
            chunk_index=request.chunk_index,
            latents=to_proto(x0_low),
            seconds=time.perf_counter() - started,
            passes=session.state.denoise_passes - before,
        )

    @rpc
    async def CommitLow(self, request: stages_pb2.ChunkLatents) -> stages_pb2.StageAck:
        session = self.sessions.get(request.session_id)
        plan = plan_chunk(session.shape, request.chunk_index)
        x0_down = from_proto(request.latents)

        def run() -> None:
            commit_low(self.model, session.state, plan, x0_down.to(session.state.cache.k.device))

        async with session.lock:
            await self._compute(run)
        return stages_pb2.StageAck(
            session_id=request.session_id, kv_bytes=session.state.cache.nbytes
        )


class RefineStage(_DenoiseStage):
    """High-res refinement; holds KV_high per session and drives the dual-cache commit."""

    stage = "refine stage"
    resolution = "high"

    def __init__(self, settings: ServeSettings, structure) -> None:
        super().__init__(settings)
        self.structure = structure  # handle to StructureStage, for CommitLow

    @rpc
    async def Refine(self, request: stages_pb2.ChunkLatents) -> stages_pb2.ChunkLatents:
        session = self.sessions.get(request.session_id)
        plan = plan_chunk(session.shape, request.chunk_index)
        options = session.shape.preset.options
        dual = session.shape.mode.dual_resolution
        device = session.state.cache.k.device
        x0_low = from_proto(request.latents, device) if dual else None
        if dual and x0_low is None:
            raise InvalidArgument(f"mode {session.shape.mode.name!r} needs the low-res x0")

        def run() -> tuple[torch.Tensor, torch.Tensor | None]:
            x = None
            if x0_low is not None:
                x = upsample(x0_low, plan, session.state.latent_hw, options, session.seed)
            x0 = high_steps(self.model, session.state, plan, options, session.seed, x)
            commit_high(self.model, session.state, plan, x0)
            down = downsample(x0, session.shape.low_latent_hw) if dual else None
            return x0, down

        async with session.lock:
            started = time.perf_counter()
            passes = session.state.denoise_passes + session.state.commit_passes
            x0, down = await self._compute(run)
            seconds = time.perf_counter() - started
            passes = session.state.denoise_passes + session.state.commit_passes - passes
            if down is not None:
                await self.structure.options(session_id=request.session_id).CommitLow.remote(
                    stages_pb2.ChunkLatents(
                        session_id=request.session_id,
                        chunk_index=request.chunk_index,
                        latents=to_proto(down),
                    )
                )
        return stages_pb2.ChunkLatents(
            session_id=request.session_id,
            chunk_index=request.chunk_index,
            latents=to_proto(x0),
            seconds=seconds,
            passes=passes,
        )


@dataclass
class DecodeStream:
    """One session's decoder state, fMP4 encoder and where its media goes."""

    kind: str  # "video" or "session"
    object_id: str  # the video or session id its objects are stored under
    encoder: FragmentedMp4Encoder
    init: bytes
    vae_state: VAEDecodeState
    writer: SessionWriter | None  # kind "session": segments + HLS playlist in storage
    layout: Layout
    segments: list[bytes] = field(default_factory=list)  # kind "video": kept for the MP4
    frames: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DecodeStage(_SessionStage[DecodeStream]):
    """Streaming VAE decode -> fMP4 encode -> storage, per session; scaled on its own."""

    stage = "decode pool"

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        preset = settings.get_preset()
        self.vae = vae_for(preset, settings.weight_paths(), settings.device, settings.torch_dtype())
        self.storage = open_storage(settings.storage)

    @rpc
    async def OpenStream(
        self, request: stages_pb2.OpenStreamRequest
    ) -> stages_pb2.OpenStreamResponse:
        if request.kind not in ("video", "session"):
            raise InvalidArgument(f"stream kind {request.kind!r} must be 'video' or 'session'")
        if not request.object_id:
            raise InvalidArgument("OpenStream needs the object_id to store media under")
        self._start_reaper()
        self.sessions.check_room(request.session_id)
        encoder = FragmentedMp4Encoder(request.width, request.height, fps=request.fps)
        init = encoder.init_segment()
        layout = Layout(request.tenant or self.settings.tenant)
        writer = None
        if request.kind == "session":
            writer = SessionWriter(self.storage, layout, request.object_id, request.fps)
            await asyncio.to_thread(writer.write_init, init)
        stream = DecodeStream(
            kind=request.kind,
            object_id=request.object_id,
            encoder=encoder,
            init=init,
            vae_state=self.vae.new_decode_state(),
            writer=writer,
            layout=layout,
        )
        try:
            self.sessions.add(request.session_id, stream)
        except BaseException:
            encoder.close()
            raise
        return stages_pb2.OpenStreamResponse(session_id=request.session_id, init_segment=init)

    @rpc
    async def DecodeChunk(self, request: stages_pb2.ChunkLatents) -> stages_pb2.DecodedSegment:
        stream = self.sessions.get(request.session_id)
        dtype = next(self.vae.parameters()).dtype
        device = next(self.vae.parameters()).device
        z = from_proto(request.latents, device).to(dtype)

        def run() -> tuple[bytes, int, float, float]:
            started = time.perf_counter()
            frames, stream.vae_state = self.vae.decode_chunk(z, stream.vae_state)
            frames = frames[0].transpose(0, 1).float().cpu()  # (F, 3, H, W)
            decoded = time.perf_counter()
            segment = stream.encoder.encode_segment(frames)
            return segment, frames.shape[0], decoded - started, time.perf_counter() - decoded

        async with stream.lock:
            segment, n, decode_s, encode_s = await asyncio.to_thread(run)
            first = stream.frames
            stream.frames += n
            key = ""
            if stream.writer is not None:
                index = request.chunk_index + 1
                key = await asyncio.to_thread(stream.writer.write_segment, index, segment, n)
            else:
                stream.segments.append(segment)
        return stages_pb2.DecodedSegment(
            session_id=request.session_id,
            chunk_index=request.chunk_index,
            first_frame=first,
            num_frames=n,
            data=segment,
            object_key=key,
            decode_seconds=decode_s,
            encode_seconds=encode_s,
        )

    @rpc
    async def FinishStream(
        self, request: stages_pb2.FinishStreamRequest
    ) -> stages_pb2.FinishStreamResponse:
        stream = self.sessions.get(request.session_id)
        async with stream.lock:
            manifest: dict = {}
            if stream.kind == "video":
                video = stream.init + b"".join(stream.segments)
                base = json.loads(request.manifest_json or "{}")
                manifest = await asyncio.to_thread(
                    publish_video,
                    self.storage,
                    stream.layout,
                    stream.object_id,
                    {"video.mp4": (video, "video/mp4")},
                    {**base, "num_frames": stream.frames},
                )
            elif stream.writer is not None:
                await asyncio.to_thread(stream.writer.end)
            frames = stream.frames
        self._drop(request.session_id)
        return stages_pb2.FinishStreamResponse(
            session_id=request.session_id, num_frames=frames, manifest_json=json.dumps(manifest)
        )

    @rpc
    async def CloseStream(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        self._drop(request.session_id)
        return stages_pb2.StageAck(session_id=request.session_id)

    def _drop(self, session_id: str) -> None:
        stream = self.sessions.pop(session_id)
        if stream is not None:
            stream.encoder.close()

    def check_health(self) -> None:
        if self.vae is None:
            raise RuntimeError("decode pool has no VAE")

    def stats(self) -> dict:
        """Streams held and RPC calls served (this replica)."""
        return {"sessions": len(self.sessions), "calls": self.calls}
