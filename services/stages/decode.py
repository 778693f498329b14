"""The decode pool: per session, streaming VAE decode -> fMP4 encode -> storage; scaled on its
own. Implements `DecodeStage` of `stages.proto`.

A video job's segments are kept until `FinishStream` publishes them as one MP4, then its
manifest; a streaming session's segments are stored as they come, with a growing HLS playlist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from histream_model.components import vae_for
from histream_model.vae import VAEDecodeState
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument
from services.media import FragmentedMp4Encoder, progressive_mp4
from services.protocol import StageName, StreamKind, from_proto
from services.settings import ServeSettings
from services.stages.base import SessionStage, rpc
from services.storage import Layout, SessionWriter, VideoManifest, open_storage, publish_video

log = logging.getLogger("histream.stages")


@dataclass
class DecodeStream:
    """One session's decoder state, fMP4 encoder and where its media goes."""

    kind: StreamKind
    object_id: str  # the video or session id its objects are stored under
    encoder: FragmentedMp4Encoder
    init: bytes
    vae_state: VAEDecodeState
    writer: SessionWriter | None  # kind SESSION: segments + HLS playlist in storage
    layout: Layout
    fps: int
    segments: list[bytes] = field(default_factory=list)  # kind VIDEO: kept for the MP4
    frames: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DecodeStage(SessionStage[DecodeStream]):
    """Streaming VAE decode -> fMP4 encode -> storage, per session."""

    name = StageName.DECODE
    label = "decode pool"

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        preset = settings.get_preset()
        self.vae = vae_for(preset, settings.weight_paths(), settings.device, settings.torch_dtype())
        self.storage = open_storage(settings.storage)

    @rpc
    async def OpenStream(
        self, request: stages_pb2.OpenStreamRequest
    ) -> stages_pb2.OpenStreamResponse:
        kind = StreamKind.from_proto(request.kind)
        if not request.object_id:
            raise InvalidArgument("OpenStream needs the object_id to store media under")
        self._start_reaper()
        self.sessions.check_room(request.session_id)
        encoder = FragmentedMp4Encoder(request.width, request.height, fps=request.fps)
        init = encoder.init_segment()
        layout = Layout(request.tenant or self.settings.tenant)
        writer = None
        if kind == StreamKind.SESSION:
            writer = SessionWriter(self.storage, layout, request.object_id, request.fps)
            await asyncio.to_thread(writer.write_init, init)
        stream = DecodeStream(
            kind=kind,
            object_id=request.object_id,
            encoder=encoder,
            init=init,
            vae_state=self.vae.new_decode_state(),
            writer=writer,
            layout=layout,
            fps=request.fps,
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
            segment = await asyncio.to_thread(run)
            segment.session_id, segment.chunk_index = request.session_id, request.chunk_index
            segment.first_frame, stream.frames = stream.frames, stream.frames + segment.num_frames
            if stream.writer is not None:
                segment.object_key = await asyncio.to_thread(
                    stream.writer.write_segment,
                    request.chunk_index + 1,
                    segment.data,
                    segment.num_frames,
                )
            else:
                stream.segments.append(segment.data)
        return segment

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
        self._drop(request.session_id)
        return stages_pb2.FinishStreamResponse(
            session_id=request.session_id, num_frames=frames, manifest_key=manifest_key
        )

    def _publish(self, stream: DecodeStream, video: stages_pb2.VideoMetadata) -> None:
        """The MP4 (init + every segment), then its manifest, last."""
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
        mp4 = progressive_mp4(stream.init + b"".join(stream.segments))
        media = {"video.mp4": (mp4, "video/mp4")}
        publish_video(self.storage, stream.layout, stream.object_id, media, manifest.fields())

    @rpc
    async def CloseStream(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        stream = self.sessions.pop(request.session_id)
        if stream is not None:
            await asyncio.to_thread(self._seal, stream)
        return stages_pb2.StageAck(session_id=request.session_id)

    def _drop(self, session_id: str) -> None:
        stream = self.sessions.pop(session_id)
        if stream is not None:
            self._seal(stream)

    def _seal(self, stream: DecodeStream) -> None:
        """However a stream ends (finished, closed, or reaped when its gateway vanished), its
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
