"""What to generate, on both sides of the stage protocol: the gateway validates a request into a
`Generation` whose shape becomes a `SessionSpec`; a stage turns the spec back into the same
`VideoShape`."""

from __future__ import annotations

from dataclasses import dataclass

from histream_model.config import Preset, get_mode
from histream_model.shape import VideoShape
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument


@dataclass(frozen=True)
class Generation:
    """A validated request: what to generate. The gateway checked every field."""

    model: str  # the model id the request named (the served model, or a mode's id)
    prompt: str
    shape: VideoShape  # preset, mode, size and length
    seed: int
    seconds: str  # the length as the API reports it back, e.g. "5"
    endless: bool = False  # a session started without num_frames: shape.num_frames is its cap


def video_shape(preset: Preset, mode: str, height: int, width: int, num_frames: int) -> VideoShape:
    """The validated shape, or InvalidArgument naming the value and what is allowed."""
    try:
        return VideoShape(preset, get_mode(mode), height, width, num_frames)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def session_spec(
    session_id: str, tenant: str, shape: VideoShape, seed: int, endless: bool = False
) -> stages_pb2.SessionSpec:
    return stages_pb2.SessionSpec(
        session_id=session_id,
        tenant=tenant,
        preset=shape.preset.name,
        mode=shape.mode.name,
        height=shape.height,
        width=shape.width,
        num_frames=shape.num_frames,
        seed=seed,
        endless=endless,
    )


def shape_of(spec: stages_pb2.SessionSpec, preset: Preset) -> VideoShape:
    """The shape a spec describes, at the stage's own preset."""
    if spec.preset and spec.preset != preset.name:
        raise InvalidArgument(
            f"session {spec.session_id!r} is for preset {spec.preset!r}; this stage serves "
            f"{preset.name!r}",
            param="preset",
        )
    return video_shape(preset, spec.mode, spec.height, spec.width, spec.num_frames)
