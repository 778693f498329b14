"""MP4 files and fragmented-MP4 segments: round trips through PyAV's decoder."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from services.media import (
    FragmentedMp4Encoder,
    Mp4Writer,
    VideoInfo,
    decode_frames,
    frames_to_uint8,
    iter_boxes,
    read_video,
)

W, H = 64, 48


def gradient_clip(num_frames: int, start: int = 0) -> torch.Tensor:
    """A smooth diagonal gradient moving 2 pixels per frame, float in [-1, 1]: [T, 3, H, W]."""
    t = torch.arange(start, start + num_frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(H, dtype=torch.float32)[None, :, None]
    x = torch.arange(W, dtype=torch.float32)[None, None, :]
    phase = (x + y + 2 * t) / (W + H)  # (T, H, W)
    red = torch.sin(2 * torch.pi * phase)
    green = torch.cos(2 * torch.pi * phase)
    blue = (y / H * 2 - 1).expand_as(phase)
    return torch.stack([red, green, blue], dim=1) * 0.8  # (T, 3, H, W)


def box_types(data: bytes) -> list[str]:
    return [box.type for box in iter_boxes(data)]


def fragment_fields(segment: bytes) -> tuple[int, int]:
    """(mfhd sequence number, tfdt base media decode time) of a moof + mdat segment."""
    seq_at = segment.index(b"mfhd") + 8  # after type, version, flags
    tfdt_at = segment.index(b"tfdt")
    version = segment[tfdt_at + 4]
    fmt, size = (">Q", 8) if version == 1 else (">I", 4)
    (decode_time,) = struct.unpack(fmt, segment[tfdt_at + 8 : tfdt_at + 8 + size])
    (sequence,) = struct.unpack(">I", segment[seq_at : seq_at + 4])
    return sequence, decode_time


# frames_to_uint8


def test_frames_to_uint8_maps_rounds_and_clamps() -> None:
    frames = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.004, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 8)
    frames = frames.expand(1, 3, 1, 8)
    out = frames_to_uint8(frames)
    assert out.shape == (1, 1, 8, 3)
    assert out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 128, 191, 255, 255]
    # uint8 input only changes layout.
    u8 = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    np.testing.assert_array_equal(frames_to_uint8(u8), u8.permute(0, 2, 3, 1).numpy())


def test_frames_to_uint8_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"shape \[T, 3, H, W\], got \[3, 4, 5\]"):
        frames_to_uint8(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"got \[1, 4, 4, 5\]"):
        frames_to_uint8(torch.zeros(1, 4, 4, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        frames_to_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(TypeError, match=r"torch\.int64"):
        frames_to_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.int64))


# Mp4Writer


def test_mp4_round_trip(tmp_path: Path) -> None:
    clip = gradient_clip(17)
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, W, H, fps=16, crf=18) as writer:
        writer.write(clip[:5])  # streamed in two calls
        writer.write(clip[5:])
        assert writer.frames_written == 17
    assert read_video(path) == VideoInfo(num_frames=17, width=W, height=H)
    decoded = decode_frames(path)
    assert decoded.shape == (17, H, W, 3)
    error = np.abs(decoded.astype(np.float32) - frames_to_uint8(clip).astype(np.float32))
    assert error.mean() < 4.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16


def test_mp4_writer_size_mismatch(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match=r"frames are 64x48 .* opened for 32x48"),
        Mp4Writer(tmp_path / "a.mp4", 32, 48) as writer,
    ):
        writer.write(gradient_clip(2))
    assert not (tmp_path / "a.mp4").exists()  # the partial file was discarded


def test_mp4_writer_zero_frames_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    writer = Mp4Writer(path, W, H)
    with pytest.raises(ValueError, match=r"no frames were written to .*empty\.mp4"):
        writer.close()
    assert not path.exists()
    with pytest.raises(ValueError, match="is closed"):
        writer.write(gradient_clip(1))


def test_mp4_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="width=63 must be a positive even number"):
        Mp4Writer(tmp_path / "a.mp4", 63, 48)
    with pytest.raises(ValueError, match="fps=0 must be >= 1"):
        Mp4Writer(tmp_path / "a.mp4", 64, 48, fps=0)
    with pytest.raises(ValueError, match=r"crf=60 must be in \[0, 51\]"):
        Mp4Writer(tmp_path / "a.mp4", 64, 48, crf=60)


def test_read_video_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")


# FragmentedMp4Encoder


def test_fragmented_mp4_segments_decode() -> None:
    sizes = [5, 4, 8]
    clip = gradient_clip(sum(sizes))
    with FragmentedMp4Encoder(W, H, fps=16, crf=18) as encoder:
        init = encoder.init_segment()
        segments = []
        start = 0
        for n in sizes:
            segments.append(encoder.encode_segment(clip[start : start + n]))
            start += n
        assert (encoder.frames_encoded, encoder.segments_encoded) == (17, 3)

    assert box_types(init) == ["ftyp", "moov"]
    assert b"cmfc" in init[:32]  # CMAF brand in ftyp
    assert b"mvex" in init  # the moov announces fragments
    for segment in segments:
        assert box_types(segment) == ["moof", "mdat"]
    # Sequence numbers count up; decode times are the first frame's time in 1/16384 ticks.
    tick = 16384 // 16
    assert [fragment_fields(s) for s in segments] == [(1, 0), (2, 5 * tick), (3, 9 * tick)]

    stream_bytes = init + b"".join(segments)
    assert read_video(stream_bytes) == (17, W, H)
    decoded = decode_frames(stream_bytes)
    error = np.abs(decoded.astype(np.float32) - frames_to_uint8(clip).astype(np.float32))
    assert error.mean() < 4.0
    with av.open(io.BytesIO(stream_bytes)) as container:
        pts = [f.pts for f in container.decode(video=0)]
    assert pts == [i * tick for i in range(17)]

    # Each segment starts with an IDR frame: a viewer joining late decodes init + that segment.
    late = decode_frames(init + segments[2])
    assert late.shape == (8, H, W, 3)
    np.testing.assert_allclose(late.astype(np.float32), decoded[9:].astype(np.float32), atol=1)


def test_fragmented_mp4_errors() -> None:
    encoder = FragmentedMp4Encoder(32, 32)
    with pytest.raises(ValueError, match=r"frames are 64x48 .* opened for 32x32"):
        encoder.encode_segment(gradient_clip(2))
    with pytest.raises(ValueError, match="got 0 frames"):
        encoder.encode_segment(torch.zeros(0, 3, 32, 32))
    encoder.close()
    with pytest.raises(ValueError, match="is closed"):
        encoder.encode_segment(torch.zeros(1, 3, 32, 32))
