"""Video output with PyAV: H.264 MP4 files and fragmented-MP4 segments for streaming sessions.

- `Mp4Writer` encodes frames into an MP4 file as they arrive (a finished video for the job API).
- `FragmentedMp4Encoder` makes one init segment (ftyp + moov) and then one media segment
  (moof + mdat) per call, for WebSocket streaming; init + segments in order is a playable MP4.
- `progressive_mp4` turns a finished fragmented stream into a regular MP4 (moov first).
- `read_video` / `decode_frames` decode a file or bytes back, for checks and tests.

Frames come from the VAE as [T, 3, H, W] in [-1, 1]; `frames_to_uint8` maps them to RGB bytes.
"""

from __future__ import annotations

import io
import struct
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import av
import numpy as np
import torch
from av.container import InputContainer, OutputContainer
from av.video.frame import PictureType
from av.video.stream import VideoStream

from histream_model.config import WAN_FPS

# libx264's quality scale; 0 is lossless, 51 the worst.
CRF_RANGE = (0, 51)
# The init segment's muxer: an empty moov (no samples) with mvex, so fragments can follow;
# cmaf adds the CMAF brand (cmfc); default_base_moof makes each moof + mdat self-contained.
_INIT_MOVFLAGS = "cmaf+frag_custom+empty_moov+default_base_moof"
# A media segment's muxer: frag_custom cuts no fragment until the trailer, so a segment is
# exactly one moof + mdat; skip_trailer leaves out the mfra index.
_SEGMENT_MOVFLAGS = _INIT_MOVFLAGS + "+skip_trailer"

VideoSource = str | Path | bytes


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] uint8, or float in [-1, 1] (clamped) -> rounded uint8 RGB [T, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must have shape [T, 3, H, W], got {list(frames.shape)}")
    if frames.dtype == torch.uint8:
        rgb = frames
    elif frames.is_floating_point():
        x = frames.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("frames contain NaN or inf; expected finite values in [-1, 1]")
        rgb = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    else:
        raise TypeError(f"frames must be uint8 or floating point, got {frames.dtype}")
    # Convert on the frames' device, then move uint8 (4x less than float32) to the CPU.
    return rgb.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (T, H, W, 3)


def _check_encoder_args(width: int, height: int, fps: int, crf: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 2 or value % 2:
            raise ValueError(f"{name}={value} must be a positive even number (yuv420p)")
    if fps < 1:
        raise ValueError(f"fps={fps} must be >= 1")
    if not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
        raise ValueError(f"crf={crf} must be in [{CRF_RANGE[0]}, {CRF_RANGE[1]}]")


def _check_frame_size(rgb: np.ndarray, width: int, height: int) -> None:
    _, h, w, _ = rgb.shape
    if (w, h) != (width, height):
        raise ValueError(
            f"frames are {w}x{h} (width x height); this encoder was opened for {width}x{height}"
        )


def _add_h264_stream(
    container: OutputContainer, width: int, height: int, fps: int, options: dict[str, str]
) -> VideoStream:
    stream = container.add_stream("libx264", rate=fps, options=options)
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    return stream


def _video_frame(rgb: np.ndarray, pts: int, fps: int) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    frame.pts = pts
    frame.time_base = Fraction(1, fps)
    return frame


class _Encoder:
    """What both H.264 encoders share: checked sizes and rate, and, as a context manager,
    closed (finished) on success, aborted on an exception."""

    x264_preset = "medium"  # libx264's speed/compression trade-off

    def __init__(self, width: int, height: int, fps: int, crf: int) -> None:
        _check_encoder_args(width, height, fps, crf)
        self.width, self.height, self.fps = width, height, fps
        self._options = {"crf": str(crf), "preset": self.x264_preset}
        self._closed = False

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Mp4Writer(_Encoder):
    """Streams frames into an H.264 (libx264, yuv420p) MP4 file; use as a context manager.

    Frames are encoded as `write` receives them; only libx264's own lookahead is buffered.
    Closing after zero frames raises ValueError and leaves no file. Leaving the `with` block
    on an exception discards the partial file.
    """

    def __init__(
        self, path: str | Path, width: int, height: int, fps: int = WAN_FPS, crf: int = 23
    ) -> None:
        super().__init__(width, height, fps, crf)
        self.path = Path(path)
        self.frames_written = 0
        self._container: OutputContainer = av.open(str(self.path), mode="w", format="mp4")
        self._stream = _add_h264_stream(self._container, width, height, fps, self._options)

    def write(self, frames: torch.Tensor) -> None:
        """Encode [T, 3, H, W] frames (uint8, or float in [-1, 1]) and mux their packets."""
        if self._closed:
            raise ValueError(f"Mp4Writer for {str(self.path)!r} is closed")
        rgb = frames_to_uint8(frames)
        _check_frame_size(rgb, self.width, self.height)
        for image in rgb:
            frame = _video_frame(image, self.frames_written, self.fps)
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and write the trailer; raises ValueError if no frame was written."""
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(
                f"no frames were written to {str(self.path)!r}; an MP4 needs at least one frame"
            )
        self._closed = True
        self._container.mux(self._stream.encode(None))
        self._container.close()

    def abort(self) -> None:
        """Stop without finishing the file, and delete whatever was written."""
        if self._closed:
            return
        self._closed = True
        self._container.close()
        self.path.unlink(missing_ok=True)


class Box(NamedTuple):
    """One ISO-BMFF box inside a byte string."""

    type: str  # four-character code, e.g. "moof"
    offset: int  # where its header starts
    size: int  # header + payload bytes
    header: int  # header bytes (8, or 16 with a 64-bit size)


def iter_boxes(data: bytes | bytearray, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """The boxes laid end to end in data[start:end] (one level, no recursion)."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated box header at byte {pos} ({end - pos} bytes left)")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at byte {pos} has size {size}; {end - pos} bytes left")
        yield Box(kind.decode("latin-1"), pos, size, header)
        pos += size


def _child(data: bytes | bytearray, parent: Box, kind: str) -> Box:
    for box in iter_boxes(data, parent.offset + parent.header, parent.offset + parent.size):
        if box.type == kind:
            return box
    raise ValueError(f"no {kind!r} box inside {parent.type!r} at byte {parent.offset}")


def _set_decode_time(fragment: bytearray, decode_time: int) -> None:
    """Write baseMediaDecodeTime into the fragment's tfdt (its moof's first traf)."""
    moof = next(iter_boxes(fragment))
    tfdt = _child(fragment, _child(fragment, moof, "traf"), "tfdt")
    field = tfdt.offset + tfdt.header + 4  # after version (1 byte) and flags (3 bytes)
    if fragment[tfdt.offset + tfdt.header] == 1:
        struct.pack_into(">Q", fragment, field, decode_time)
    elif decode_time < 2**32:
        struct.pack_into(">I", fragment, field, decode_time)
    else:
        raise ValueError(f"decode time {decode_time} does not fit a version-0 tfdt")


class FragmentedMp4Encoder(_Encoder):
    """H.264 fragmented MP4: `init_segment()` once, then one moof + mdat per `encode_segment`.

    Every segment starts with an IDR frame, so a viewer can join at any segment boundary (init +
    that segment decodes on its own). libx264 runs with tune=zerolatency (no B-frames, no
    lookahead), so each frame's packet comes out as it goes in and a segment is complete when
    its last frame is encoded.

    One muxer cannot be used for all segments: the mp4 muxer closes a fragment only when the
    next packet arrives or at the trailer, and PyAV cannot send the flush packet (a NULL
    packet to av_write_frame) that cuts one on demand. So each segment is muxed by a
    short-lived muxer with the same stream parameters, closed to flush it, and cut after its
    ftyp + moov. Such a muxer starts its timeline at zero, so the fragment's tfdt (decode time)
    is set here; the mfhd sequence number comes from the muxer's fragment_index option.
    """

    x264_preset = "veryfast"

    def __init__(self, width: int, height: int, fps: int = WAN_FPS, crf: int = 23) -> None:
        super().__init__(width, height, fps, crf)
        self.frames_encoded = 0
        self.segments_encoded = 0
        options = {**self._options, "tune": "zerolatency"}
        # forced-idr: a frame marked I becomes an IDR, not just an intra frame.
        options["forced-idr"] = "1"
        header = io.BytesIO()
        # This container only writes the init segment and owns the encoder; no packet is
        # ever muxed into it.
        self._header: OutputContainer = av.open(
            header, mode="w", format="mp4", container_options={"movflags": _INIT_MOVFLAGS}
        )
        self._stream = _add_h264_stream(self._header, width, height, fps, options)
        self._header.start_encoding()
        self._init = header.getvalue()

    def resume_at(self, frames: int, segments: int) -> None:
        """Go on after `segments` segments holding `frames` frames (made by another encoder
        with the same parameters, e.g. on a replica that was lost)."""
        self.frames_encoded, self.segments_encoded = frames, segments

    def init_segment(self) -> bytes:
        """ftyp + moov (with the codec configuration); send once, before any segment."""
        return self._init

    def encode_segment(self, frames: torch.Tensor) -> bytes:
        """Encode [T, 3, H, W] frames (uint8, or float in [-1, 1]) into one moof + mdat."""
        if self._closed:
            raise ValueError("FragmentedMp4Encoder is closed")
        rgb = frames_to_uint8(frames)
        _check_frame_size(rgb, self.width, self.height)
        if len(rgb) == 0:
            raise ValueError("encode_segment got 0 frames; a segment needs at least one")
        first = self.frames_encoded
        packets: list[av.Packet] = []
        for i, image in enumerate(rgb):
            frame = _video_frame(image, first + i, self.fps)
            if i == 0:
                frame.pict_type = PictureType.I
            packets.extend(self._stream.encode(frame))
        if len(packets) != len(rgb):
            raise RuntimeError(
                f"encoder returned {len(packets)} packets for {len(rgb)} frames; "
                "segments need an encoder without frame delay"
            )
        for packet in packets:
            packet.duration = 1  # one frame in the encoder's 1/fps time base
        segment = self._mux_fragment(packets, first)
        self.frames_encoded += len(rgb)
        self.segments_encoded += 1
        return segment

    def _mux_fragment(self, packets: list[av.Packet], first_frame: int) -> bytes:
        buffer = io.BytesIO()
        options = {
            "movflags": _SEGMENT_MOVFLAGS,
            "fragment_index": str(self.segments_encoded + 1),
        }
        with av.open(buffer, mode="w", format="mp4", container_options=options) as muxer:
            stream = muxer.add_stream_from_template(self._stream, opaque=True)
            muxer.start_encoding()
            time_base = stream.time_base
            for packet in packets:
                packet.stream = stream
                muxer.mux(packet)
        data = buffer.getvalue()
        boxes = list(iter_boxes(data))
        kinds = [box.type for box in boxes]
        if kinds != ["ftyp", "moov", "moof", "mdat"]:
            raise RuntimeError(f"segment muxer wrote boxes {kinds}; expected ftyp moov moof mdat")
        fragment = bytearray(data[boxes[2].offset :])  # moof + mdat
        if time_base is None:
            raise RuntimeError("segment muxer stream has no time base")
        decode_time = Fraction(first_frame, self.fps) / time_base
        if decode_time.denominator != 1:
            raise RuntimeError(
                f"frame {first_frame} at {self.fps} fps is not a whole tick of {time_base}"
            )
        _set_decode_time(fragment, int(decode_time))
        return bytes(fragment)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._header.close()

    def abort(self) -> None:
        """Nothing to discard: segments were handed out as they were made."""
        self.close()


def progressive_mp4(fragmented: bytes) -> bytes:
    """The same H.264 stream as a regular MP4 with `moov` before `mdat` (faststart): players
    know its duration from the header. Packets are copied, not re-encoded."""
    with tempfile.TemporaryDirectory(prefix="histream-mp4-") as folder:
        path = Path(folder) / "video.mp4"
        with (
            av.open(io.BytesIO(fragmented), mode="r") as src,
            av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as dst,
        ):
            video = src.streams.video[0]
            stream = dst.add_stream_from_template(video)
            for packet in src.demux(video):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = stream
                dst.mux(packet)
        return path.read_bytes()


class VideoInfo(NamedTuple):
    num_frames: int  # frames decoded
    width: int
    height: int


def _open_input(source: VideoSource) -> InputContainer:
    if isinstance(source, bytes | bytearray):
        return av.open(io.BytesIO(source), mode="r")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(source)!r} does not exist")
    return av.open(str(path), mode="r")


def _describe(source: VideoSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else repr(str(source))


def read_video(source: VideoSource) -> VideoInfo:
    """(num_frames, width, height) of the first video stream, counted by decoding every frame."""
    with _open_input(source) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {_describe(source)}")
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return VideoInfo(count, stream.codec_context.width, stream.codec_context.height)


def decode_frames(source: VideoSource) -> np.ndarray:
    """Every frame of the first video stream as uint8 RGB [T, H, W, 3]."""
    with _open_input(source) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {_describe(source)}")
        frames = [
            f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])
        ]
    if not frames:
        raise ValueError(f"no frames decoded from {_describe(source)}")
    return np.stack(frames)  # (T, H, W, 3)
