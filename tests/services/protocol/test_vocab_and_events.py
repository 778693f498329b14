"""The shared vocabulary: enums on the stage wire, and each session event's two encodings
(WebSocket JSON + media, gRPC SessionEvent) saying the same thing."""

from __future__ import annotations

import pytest
import torch

from histream_model.config import Resolution
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument
from services.protocol import (
    ChunkReady,
    EndReason,
    InitSegment,
    PromptApplied,
    SessionEnded,
    SessionQueued,
    SessionStarted,
    StageName,
    StreamKind,
    digest,
    from_proto,
    to_proto,
)


def test_stream_kind_round_trips_the_proto_enum():
    for kind in StreamKind:
        assert StreamKind.from_proto(kind.to_proto()) is kind
    assert StreamKind.VIDEO.to_proto() == stages_pb2.STREAM_KIND_VIDEO
    with pytest.raises(
        InvalidArgument, match=r"stream kind 0 must be one of \['VIDEO', 'SESSION'\]"
    ):
        StreamKind.from_proto(stages_pb2.STREAM_KIND_UNSPECIFIED)


def test_stage_names_are_the_deployments_and_own_a_resolution():
    assert [str(n) for n in StageName] == [
        "Gateway", "StructureStage", "RefineStage", "DecodePool", "SessionMailbox",
        "StepStage1", "StepStage2", "StepStage3", "StepStage4",
    ]  # fmt: skip
    assert [StageName.step(w) for w in range(4)] == [StageName.STEP1, StageName.STEP2,
                                                      StageName.STEP3, StageName.STEP4]  # fmt: skip
    assert StageName.STEP3.worker == 2 and StageName.REFINE.worker is None
    assert StageName.STEP1.resolution is None  # a step worker may hold either resolution
    assert StageName.for_resolution(Resolution.LOW) == StageName.STRUCTURE
    assert StageName.for_resolution(Resolution.HIGH) == StageName.REFINE
    assert StageName.REFINE.resolution == Resolution.HIGH
    assert StageName.DECODE.resolution is None


def test_codec_is_bit_exact_for_every_model_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(2, 3, 4).to(dtype)
        back = from_proto(to_proto(t))
        assert back.dtype == dtype and torch.equal(back, t)
    assert digest(to_proto(torch.zeros(2))) != digest(to_proto(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"cannot send dtype torch\.int64"):
        to_proto(torch.zeros(2, dtype=torch.int64))


def chunk() -> ChunkReady:
    latents = to_proto(torch.ones(1, 16, 3, 8, 12))
    return ChunkReady(
        index=2, first_frame=21, num_frames=12, media=b"\x00moof", object_key="k",
        prompt_version=1, latents=latents, latents_sha256=digest(latents),
        denoise_seconds=0.1, decode_seconds=0.2, kv_bytes=10,
    )  # fmt: skip


EVENTS = [
    SessionStarted("sess_1", 192, 128, 16, 10, 117, "tenants/default/sessions/sess_1/p.m3u8", "tk"),
    SessionQueued(position=3),
    InitSegment(b"ftyp...moov"),
    chunk(),
    PromptApplied(prompt_version=1, from_chunk=2),
    SessionEnded(EndReason.CLOSED),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_websocket_and_grpc_encodings_agree(event):
    message, wire = event.message(), event.proto()
    oneof = wire.WhichOneof("event")
    expected_oneof = {
        "session.started": "started", "init": "init", "chunk": "chunk",
        "prompt.applied": "prompt_updated", "session.ended": "ended", "queued": "queued",
    }[message["type"]]  # fmt: skip
    assert oneof == expected_oneof
    body = getattr(wire, oneof)
    for key, value in message.items():
        if key == "type":
            continue
        if key == "bytes":
            assert value == len(event.payload) == len(body.data)
            assert body.data == event.payload
        else:
            assert getattr(body, key) == value, key
    assert (event.payload is None) == (message["type"] not in ("init", "chunk"))


def test_ended_reasons_are_the_public_words():
    assert SessionEnded(EndReason.COMPLETED).message() == {
        "type": "session.ended",
        "reason": "completed",
    }
    assert SessionEnded(EndReason.CLOSED).proto().ended.reason == "closed"
