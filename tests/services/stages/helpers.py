"""What the stage tests share: session specs and stream requests at one small size."""

from __future__ import annotations

from protos.histream.v1 import stages_pb2
from services.protocol import StreamKind
from services.stages import StructureStage

W, H = 96, 64


def spec(session_id: str, mode: str = "histream+", frames: int = 21, seed: int = 4):
    return stages_pb2.SessionSpec(
        session_id=session_id, tenant="default", preset="tiny", mode=mode,
        height=H, width=W, num_frames=frames, seed=seed,
    )  # fmt: skip


def video_stream(session_id: str, object_id: str) -> stages_pb2.OpenStreamRequest:
    kind = StreamKind.VIDEO.to_proto()
    return stages_pb2.OpenStreamRequest(
        session_id=session_id, object_id=object_id, kind=kind, width=W, height=H, fps=16
    )


async def open_two(structure: StructureStage) -> stages_pb2.Tensor:
    """Sessions "a" and "b" open on `structure`; returns the prompt context they use."""
    context = (await structure.EncodePrompt(stages_pb2.EncodePromptRequest(prompt="x"))).context
    for sid in ("a", "b"):
        await structure.OpenSession(stages_pb2.OpenSessionRequest(spec=spec(sid), context=context))
    return context
