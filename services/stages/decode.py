"""The decode pool: per session, streaming VAE decode -> fMP4 encode -> storage; scaled on its
own. Implements `DecodeStage` of `stages.proto`.

Every segment is stored as it is made: a streaming session's as HLS segments with a growing
playlist, a video job's as parts that `FinishStream` joins into one MP4 (then its manifest). So
a replica that is lost loses no media, and `RestoreStream` takes a stream up on any replica from
its snapshot: the decoder re-primed from the last latent frames, the encoder and the playlist
going on where they stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from histream_model.components import decoder_for
from histream_model.taehv import TAEHVDecodeState
from histream_model.vae import VAEDecodeState
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument, SessionNotHeld
from services.logs import ids
from services.media import FragmentedMp4Encoder, progressive_mp4
from services.protocol import StageName, StreamKind, from_proto
from services.protocol.identity import replica_name
from services.protocol.snapshot import decode_tail, frames_done, stored_frames
from services.settings import ServeSettings
from services.stages.base import SessionStage, rpc
from services.storage import (
    Layout,
    SessionWriter,
    VideoManifest,
    VideoParts,
    open_storage,
    publish_video,
)

log = logging.getLogger("histream.stages")


@dataclass
class DecodeStream:
    """One session's decoder state, fMP4 encoder and where its media goes."""

    kind: StreamKind
    object_id: str  # the video or session id its objects are stored under
    encoder: FragmentedMp4Encoder
    init: bytes
    vae_state: VAEDecodeState | TAEHVDecodeState
    writer: SessionWriter | None  # kind SESSION: segments + HLS playlist
    parts: VideoParts | None  # kind VIDEO: segments until FinishStream joins them
    layout: Layout
    fps: int
    frames: int = 0  # video frames encoded so far
    segments: int = 0  # media segments stored so far
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DecodeStage(SessionStage[DecodeStream]):
    """Streaming VAE decode -> fMP4 encode -> storage, per session."""

    name = StageName.DECODE
    label = "decode pool"
    grpc_services = ("DecodeStage",)

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        preset = settings.get_preset()
        self.vae = decoder_for(
            preset,
            settings.decoder,
            settings.weight_paths(),
            settings.decoder_weights,
            settings.device,
            settings.torch_dtype(),
        )
        self.storage = open_storage(settings.storage)

    async def _start(
        self,
        session_id: str,
        kind: StreamKind,
        object_id: str,
        size: tuple[int, int],
        fps: int,
        tenant: str,
        resume: stages_pb2.SessionSnapshot | None = None,
        endless: bool = False,
    ) -> DecodeStream:
        """A new stream, or one taken up from a snapshot; stores the init segment first."""
        if not object_id:
            raise InvalidArgument("a stream needs the object_id to store media under")
        self._start_reaper()
        self._make_room(session_id)
        encoder = FragmentedMp4Encoder(*size, fps=fps)
        layout = Layout(tenant or self.settings.tenant)
        stream = DecodeStream(
            kind=kind,
            object_id=object_id,
            encoder=encoder,
            init=encoder.init_segment(),
            vae_state=self.vae.new_decode_state(),
            writer=self._writer(layout, object_id, fps, endless)
            if kind == StreamKind.SESSION
            else None,
            parts=VideoParts(self.storage, layout, object_id) if kind == StreamKind.VIDEO else None,
            layout=layout,
            fps=fps,
        )
        try:
            if resume is not None and resume.next_chunk:
                await asyncio.to_thread(self._take_up, stream, resume)
            elif stream.writer is not None:
                await asyncio.to_thread(stream.writer.write_init, stream.init)
            else:
                assert stream.parts is not None
                await asyncio.to_thread(stream.parts.write, 0, stream.init)
            self.sessions.add(session_id, stream)
        except BaseException:
            encoder.close()
            raise
        return stream

    def _writer(self, layout: Layout, object_id: str, fps: int, endless: bool) -> SessionWriter:
        """A session's segments and playlist; an endless one's a live window (old segments
        deleted as new ones land)."""
        window = self.settings.hls_window_segments if endless else None
        return SessionWriter(self.storage, layout, object_id, fps, window=window)

    def _take_up(self, stream: DecodeStream, snapshot: stages_pb2.SessionSnapshot) -> None:
        first, frames = stored_frames(snapshot)
        stream.frames, stream.segments = frames_done(snapshot), snapshot.next_chunk
        stream.encoder.resume_at(stream.frames, stream.segments)
        tail, before = decode_tail(snapshot, self.settings.snapshot_decode_frames)
        if tail is None:
            raise InvalidArgument("the snapshot keeps no latents to resume the decoder from")
        stream.vae_state = self.vae.resume_decode_state(tail, before)
        if stream.writer is not None:
            stream.writer.resume(frames, first + 1)

    @rpc
    async def OpenStream(
        self, request: stages_pb2.OpenStreamRequest
    ) -> stages_pb2.OpenStreamResponse:
        kind = StreamKind.from_proto(request.kind)
        size = (request.width, request.height)
        stream = await self._start(
            request.session_id, kind, request.object_id, size, request.fps, request.tenant,
            endless=request.endless,
        )  # fmt: skip
        return stages_pb2.OpenStreamResponse(
            session_id=request.session_id, init_segment=stream.init
        )

    @rpc
    async def RestoreStream(self, request: stages_pb2.RestoreRequest) -> stages_pb2.RestoreResponse:
        """Take the stream up from its snapshot, replacing what this replica holds of it; a
        stream kept here since its suspend, exactly where the snapshot stands, goes on as is."""
        snapshot, started = request.snapshot, time.perf_counter()
        kept = self.sessions.take_up(request.session_id)
        frames = frames_done(snapshot)
        if kept is not None:
            async with kept.lock:  # a decode still running for the suspended driver ends first
                adopt = (kept.segments, kept.frames) == (snapshot.next_chunk, frames)
        if kept is not None and adopt:
            log.info(
                "decode pool took up kept stream %s", request.session_id,
                extra=ids(session_id=request.session_id),
            )  # fmt: skip
            return stages_pb2.RestoreResponse(
                session_id=request.session_id,
                seconds=time.perf_counter() - started,
                init_segment=kept.init,
                adopted=True,
            )
        replaced = self.sessions.discard(request.session_id)
        if replaced is not None:
            replaced.encoder.close()
        spec = snapshot.spec
        stream = await self._start(
            request.session_id,
            StreamKind.from_proto(snapshot.kind),
            snapshot.object_id,
            (spec.width, spec.height),
            snapshot.fps,
            spec.tenant,
            resume=snapshot,
            endless=spec.endless,
        )
        log.info(
            "decode pool restored %s at chunk %d", request.session_id, snapshot.next_chunk,
            extra=ids(session_id=request.session_id),
        )  # fmt: skip
        return stages_pb2.RestoreResponse(
            session_id=request.session_id,
            seconds=time.perf_counter() - started,
            init_segment=stream.init,
        )

    @rpc
    async def DecodeChunk(self, request: stages_pb2.ChunkLatents) -> stages_pb2.DecodedSegment:
        stream = self.sessions.get(request.session_id)
        z = from_proto(request.latents)

        def run() -> stages_pb2.DecodedSegment:
            started = time.perf_counter()
            frames, stream.vae_state = self.vae.decode_frames(z, stream.vae_state)
            decoded = time.perf_counter()
            data = stream.encoder.encode_segment(frames)
            return stages_pb2.DecodedSegment(
                data=data,
                num_frames=frames.shape[0],
                decode_seconds=decoded - started,
                encode_seconds=time.perf_counter() - decoded,
            )

        async with stream.lock:
            self._check_in_order(request, stream)
            segment = await asyncio.to_thread(run)
            segment.session_id, segment.chunk_index = request.session_id, request.chunk_index
            segment.first_frame, stream.frames = stream.frames, stream.frames + segment.num_frames
            index = request.chunk_index + 1
            if stream.writer is not None:
                segment.object_key = await asyncio.to_thread(
                    stream.writer.write_segment, index, segment.data, segment.num_frames
                )
            else:
                assert stream.parts is not None
                await asyncio.to_thread(stream.parts.write, index, segment.data)
            stream.segments = index
        return segment

    def _check_in_order(self, request: stages_pb2.ChunkLatents, stream: DecodeStream) -> None:
        """A chunk is decoded only by the stream that decoded the chunk before it. Anything else
        is a copy left behind: the session moved to another replica (a replica change) and back,
        and this copy missed the chunks decoded there. It answers as a lost session, so the
        driver restores it here from the snapshot (never a wrong decoder state or a gap)."""
        if request.chunk_index != stream.segments:
            raise SessionNotHeld(
                f"{self.label} replica {replica_name()} holds session {request.session_id!r} "
                f"with {stream.segments} chunk(s) decoded, not the state chunk "
                f"{request.chunk_index} follows: a stale copy (the session ran elsewhere "
                "meanwhile); it is restored"
            )

    @rpc
    async def FinishStream(
        self, request: stages_pb2.FinishStreamRequest
    ) -> stages_pb2.FinishStreamResponse:
        stream = self.sessions.get(request.session_id)
        async with stream.lock:
            manifest_key = ""
            if stream.kind == StreamKind.VIDEO:
                await asyncio.to_thread(self._publish, stream, request.video)
                manifest_key = stream.layout.video_manifest_key(stream.object_id)
            elif stream.writer is not None:
                await asyncio.to_thread(stream.writer.end)
            frames = stream.frames
        self.sessions.pop(request.session_id)
        stream.encoder.close()
        return stages_pb2.FinishStreamResponse(
            session_id=request.session_id, num_frames=frames, manifest_key=manifest_key
        )

    def _publish(self, stream: DecodeStream, video: stages_pb2.VideoMetadata) -> None:
        """The MP4 (its stored parts joined, remuxed moov-first), then its manifest, last."""
        assert stream.parts is not None
        manifest = VideoManifest(
            id=video.id or stream.object_id,
            model=video.model,
            mode=video.mode,
            seed=video.seed,
            size=video.size,
            fps=video.fps or stream.fps,
            created_at=video.created_at,
            num_frames=stream.frames,
        )
        mp4 = progressive_mp4(stream.parts.join(stream.segments))
        media = {"video.mp4": (mp4, "video/mp4")}
        publish_video(self.storage, stream.layout, stream.object_id, media, manifest.fields())
        stream.parts.remove()

    @rpc
    async def CloseStream(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        """The session ends unfinished: its playlist is sealed, a video's parts removed; or it
        is suspended (`suspend`), to go on later: its media stays as it is (and its state here
        for `keep_s`)."""
        if self._kept(request):
            return stages_pb2.StageAck(session_id=request.session_id)
        stream = self.sessions.pop(request.session_id)
        if stream is not None and request.suspend:
            stream.encoder.close()
        elif stream is not None:
            await asyncio.to_thread(self._seal, stream)
            if stream.parts is not None:
                await asyncio.to_thread(stream.parts.remove)
        return stages_pb2.StageAck(session_id=request.session_id)

    def _free(self, session_id: str) -> None:
        """A stream nobody will close (kept past its time; its gateway vanished): freed, and
        sealed unless a snapshot lets it go on (the gateway's sweeper seals it when that
        expires; a video job is taken up or failed by the gateway)."""
        stream = self.sessions.pop(session_id)
        if stream is None:
            return
        snapshot = stream.layout.snapshot_key(str(stream.kind), stream.object_id)
        try:
            resumable = self.storage.exists(snapshot)
        except Exception:  # storage down: keep the media as it is
            resumable = True
        if resumable:
            stream.encoder.close()
        else:
            self._seal(stream)

    def _seal(self, stream: DecodeStream) -> None:
        """However a stream ends (finished, closed, or freed with nothing to go on from), its
        encoder is freed and a session's playlist gets its ENDLIST, so no player polls it
        forever."""
        stream.encoder.close()
        if stream.writer is not None and not stream.writer.ended:
            try:
                stream.writer.end()
            except Exception:  # storage down: the stream is freed all the same
                log.exception("could not seal the playlist of %s", stream.object_id)

    def check_health(self) -> None:
        if self.vae is None:
            raise RuntimeError("decode pool has no VAE")
