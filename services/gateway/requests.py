"""Public request models and their validation against the served preset.

Every field is checked here, at the gateway, before anything reaches a stage; each error names
the field, the value and what is allowed (HTTP 400 / gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from histream_model.config import MODES, Preset, check_video_shape, get_mode
from services.errors import InvalidArgument
from services.protocol import Generation, video_shape

SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
DEFAULT_MODE = "histream+"
MAX_SEED = 2**63 - 1


class VideoCreate(BaseModel):
    """POST /v1/videos (JSON or multipart) and gRPC CreateVideo."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    model: str | None = None
    seconds: str | int | None = None
    size: str | None = None
    seed: int | str | None = None
    mode: str | None = None


class SessionStart(BaseModel):
    """The first message of a WebSocket session, and gRPC StreamSession."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    model: str | None = None
    size: str | None = None
    seed: int | str | None = None
    mode: str | None = None
    num_frames: int | str | None = None


def parse(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidArgument(f"{field}: {first['msg']}", param=field) from None


def check_prompt_field(prompt: str | None, max_chars: int) -> str:
    text = (prompt or "").strip()
    if not text:
        raise InvalidArgument("prompt must be a non-empty string", param="prompt")
    if len(text) > max_chars:
        raise InvalidArgument(
            f"prompt has {len(text)} characters; the limit is {max_chars}", param="prompt"
        )
    return text


def model_ids(served: str) -> list[str]:
    """What `model` may name (GET /v1/models): the served model, or one of its modes."""
    return [served, *(m for m in MODES if m != served)]


def check_mode(mode: str | None) -> str:
    name = mode or DEFAULT_MODE
    if name not in MODES:
        raise InvalidArgument(f"mode {name!r} is unknown; choose one of {list(MODES)}", "mode")
    return name


def check_model(model: str | None, mode: str | None, served: str) -> tuple[str, str]:
    """(model, mode): `model` is the served model (the mode from `mode`) or a mode's id."""
    if model in (None, "", served):
        return served, check_mode(mode)
    if model in MODES:
        if mode not in (None, "", model):
            raise InvalidArgument(
                f"mode {mode!r} contradicts model {model!r}, which names mode {model!r}", "mode"
            )
        return model, model
    raise InvalidArgument(
        f"model {model!r} is not served here; this server serves {served!r}, or one of its "
        f"modes as the model: {model_ids(served)[1:]}",
        "model",
    )


def check_seed(seed: int | str | None) -> int:
    if seed in (None, ""):
        return 0
    try:
        value = int(seed)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(f"seed {seed!r} must be an integer", param="seed") from None
    if not 0 <= value <= MAX_SEED:
        raise InvalidArgument(f"seed={value} must be in [0, {MAX_SEED}]", param="seed")
    return value


def check_size(size: str | None, preset: Preset, mode: str) -> tuple[int, int]:
    """ "WxH" within the preset's maximum, in multiples the model can generate."""
    if size in (None, ""):
        return preset.width, preset.height
    m = SIZE.match(size)
    if m is None:
        raise InvalidArgument(
            f"size {size!r} must look like 'WIDTHxHEIGHT', e.g. '192x128'", "size"
        )
    width, height = int(m.group(1)), int(m.group(2))
    if width > preset.max_width or height > preset.max_height:
        raise InvalidArgument(
            f"size {width}x{height} is above this model's maximum "
            f"{preset.max_width}x{preset.max_height}",
            param="size",
        )
    try:
        check_video_shape(preset, get_mode(mode), height, width, preset.num_frames)
    except ValueError as err:
        raise InvalidArgument(f"size {width}x{height}: {err}", param="size") from None
    return width, height


def valid_frame_counts(preset: Preset) -> range:
    """Frame counts the model produces: 1 + 4(kM - 1) for k whole chunks of M latent frames."""
    t, m = preset.vae.temporal_stride, preset.options.chunk_frames
    step = t * m
    return range(1 + t * (m - 1), preset.max_num_frames + 1, step)


def frames_for_seconds(seconds: int, fps: int, preset: Preset) -> int:
    """The shortest valid frame count lasting at least `seconds` at `fps`."""
    wanted = seconds * fps + 1
    for frames in valid_frame_counts(preset):
        if frames >= wanted:
            return frames
    raise AssertionError("unreachable: seconds were range-checked")


def max_seconds(fps: int, preset: Preset) -> int:
    return (valid_frame_counts(preset)[-1] - 1) // fps


def check_seconds(seconds: str | int | None, fps: int, preset: Preset) -> tuple[int, str]:
    """(num_frames, seconds as reported) for a requested duration."""
    if seconds in (None, ""):
        frames = preset.num_frames
        return frames, str(round((frames - 1) / fps))
    try:
        value = int(str(seconds).strip())
    except ValueError:
        raise InvalidArgument(f"seconds {seconds!r} must be a whole number", "seconds") from None
    top = max_seconds(fps, preset)
    if not 1 <= value <= top:
        raise InvalidArgument(f"seconds={value} must be in [1, {top}]", param="seconds")
    return frames_for_seconds(value, fps, preset), str(value)


def check_num_frames(num_frames: int | str | None, preset: Preset) -> int:
    if num_frames in (None, "", 0):
        return preset.num_frames
    try:
        value = int(num_frames)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"num_frames {num_frames!r} must be an integer", "num_frames"
        ) from None
    valid = valid_frame_counts(preset)
    if value not in valid:
        raise InvalidArgument(
            f"num_frames={value} must be one of {valid[0]}, {valid[1]}, ..., {valid[-1]} "
            f"(1 + 4k frames in whole {preset.options.chunk_frames}-latent-frame chunks)",
            param="num_frames",
        )
    return value


def _resolve(
    body: VideoCreate | SessionStart,
    preset: Preset,
    served_model: str,
    max_prompt_chars: int,
    length: Callable[[], tuple[int, str]],
) -> Generation:
    """Check the fields both request kinds share; `length` gives (num_frames, seconds)."""
    prompt = check_prompt_field(body.prompt, max_prompt_chars)
    model, mode = check_model(body.model, body.mode, served_model)
    width, height = check_size(body.size, preset, mode)
    frames, seconds = length()
    shape = video_shape(preset, mode, height, width, frames)
    seed = check_seed(body.seed)
    return Generation(model=model, prompt=prompt, shape=shape, seed=seed, seconds=seconds)


def resolve_video(
    body: VideoCreate, preset: Preset, served_model: str, fps: int, max_prompt_chars: int
) -> Generation:
    def length() -> tuple[int, str]:
        return check_seconds(body.seconds, fps, preset)

    return _resolve(body, preset, served_model, max_prompt_chars, length)


def resolve_session(
    body: SessionStart, preset: Preset, served_model: str, fps: int, max_prompt_chars: int
) -> Generation:
    def length() -> tuple[int, str]:
        frames = check_num_frames(body.num_frames, preset)
        return frames, str(math.ceil((frames - 1) / fps))

    return _resolve(body, preset, served_model, max_prompt_chars, length)
