"""Public requests and their validation against the served preset: one layer for every
transport (HTTP JSON and forms, WebSocket messages, gRPC), so the same input gets the same answer.

Every field is checked here, at the gateway, before anything reaches a stage; each error names
the public field (`param`), the value and what is allowed (HTTP 400 / gRPC INVALID_ARGUMENT).
Types are strict: no booleans or fractions as numbers, ASCII digits only, text without lone
surrogates or control characters, sizes the model can produce at every step.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Self

from histream_model.conditioning import check_transition
from histream_model.config import MODES, Preset, get_mode
from histream_model.shape import check_video_shape
from services.errors import InvalidArgument
from services.protocol import Generation, video_shape
from services.sessions.prompts import PromptUpdate

SIZE = re.compile(r"\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*", re.ASCII)
DEFAULT_MODE = "histream+"
MAX_SEED = 2**63 - 1
MAX_DIGITS = 19  # enough for any seed; longer numbers are refused before converting them
# Control characters a prompt may hold: whitespace. Every other one (NUL, ESC, ...) is refused.
PROMPT_WHITESPACE = "\t\n\r"


# -- strict scalars: the same rules for JSON, form fields, WebSocket messages and gRPC -----------


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        float: "a number with a fraction",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _check_text(value: str, name: str, allowed_controls: str = "") -> str:
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidArgument(f"{name} is not valid Unicode (a lone surrogate)", param=name)
        if category == "Cc" and char not in allowed_controls:
            raise InvalidArgument(
                f"{name} contains the control character U+{ord(char):04X}", param=name
            )
    return value


def text(data: Mapping[str, object], name: str, allowed_controls: str = "") -> str | None:
    """A string field; absent, null and "" are None."""
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {_kind(value)}", param=name)
    return _check_text(value, name, allowed_controls)


def whole(data: Mapping[str, object], name: str) -> int | None:
    """A whole number: an integer, or a string of the ASCII digits 0-9 (what form fields and
    the OpenAI API's `seconds` send). No booleans, fractions, signs, separators or other
    scripts' digits. Absent, null and "" are None."""
    value = data.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{name} must be a whole number, got {_kind(value)}", param=name)
    if isinstance(value, int):
        return value
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_DIGITS:
        raise InvalidArgument(
            f"{name} {value[:40]!r} must be a whole number written with the digits 0-9"
            f" (at most {MAX_DIGITS})",
            param=name,
        )
    return int(digits)


def prompt_text(data: Mapping[str, object], name: str) -> str | None:
    return text(data, name, PROMPT_WHITESPACE)


def _field(reader: Callable[[Mapping[str, object], str], object]):
    """A request field read by `reader` (text, whole, prompt_text); absent: None."""
    return field(default=None, metadata={"read": reader})


class _Request:
    @classmethod
    def parse(cls, data: Mapping[str, object]) -> Self:
        """The request from any transport's fields (a dict); unknown fields are ignored."""
        return cls(**{f.name: f.metadata["read"](data, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class _Generating(_Request):
    """The fields every generation request has."""

    prompt: str | None = _field(prompt_text)
    model: str | None = _field(text)  # the served model, or a mode's id (GET /v1/models)
    size: str | None = _field(text)  # "WIDTHxHEIGHT"
    seed: int | None = _field(whole)
    mode: str | None = _field(text)


@dataclass(frozen=True)
class VideoCreate(_Generating):
    """POST /v1/videos (JSON or a form) and gRPC CreateVideo."""

    seconds: int | None = _field(whole)


@dataclass(frozen=True)
class SessionStart(_Generating):
    """The first message of a WebSocket session, and gRPC StreamSession."""

    num_frames: int | None = _field(whole)


def check_prompt_field(prompt: object, max_chars: int) -> str:
    """A prompt from any transport: a non-empty string of text within the limit."""
    value = prompt_text({"prompt": prompt}, "prompt")
    stripped = (value or "").strip()
    if not stripped:
        raise InvalidArgument("prompt must be a non-empty string", param="prompt")
    if len(stripped) > max_chars:
        raise InvalidArgument(
            f"prompt has {len(stripped)} characters; the limit is {max_chars}", param="prompt"
        )
    return stripped


def check_prompt_update(data: Mapping[str, object], max_chars: int) -> PromptUpdate:
    """A prompt change's fields from any transport: `prompt`, and optionally
    `transition_chunks` (1-64; default 1, a cut), `interpolation` (linear | slerp) and
    `recache` (true: rebuild the window's caches under the new prompt)."""
    prompt = check_prompt_field(data.get("prompt"), max_chars)
    recache = data.get("recache", False)
    if recache is None:
        recache = False
    if not isinstance(recache, bool):
        raise InvalidArgument(f"recache must be true or false, got {_kind(recache)}", "recache")
    chunks = whole(data, "transition_chunks")
    interpolation = text(data, "interpolation")
    try:
        check_transition(1 if chunks is None else chunks, interpolation or "linear")
    except ValueError as err:
        param = "interpolation" if "interpolation" in str(err) else "transition_chunks"
        raise InvalidArgument(str(err), param) from None
    chunks = 1 if chunks is None else chunks
    return PromptUpdate(prompt, chunks, interpolation or "linear", recache)


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


def check_seed(seed: int | None) -> int:
    value = 0 if seed is None else seed
    if not 0 <= value <= MAX_SEED:
        raise InvalidArgument(f"seed={value} must be in [0, {MAX_SEED}]", param="seed")
    return value


def check_size(size: str | None, preset: Preset, mode: str) -> tuple[int, int]:
    """ "WxH" within the preset's maximum, in multiples the model can generate."""
    if size is None:
        return preset.width, preset.height
    m = SIZE.fullmatch(size)
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


def check_seconds(value: int | None, fps: int, preset: Preset) -> tuple[int, str]:
    """(num_frames, seconds as reported) for a requested duration."""
    if value is None:
        frames = preset.num_frames
        return frames, str(round((frames - 1) / fps))
    top = max_seconds(fps, preset)
    if not 1 <= value <= top:
        raise InvalidArgument(f"seconds={value} must be in [1, {top}]", param="seconds")
    return frames_for_seconds(value, fps, preset), str(value)


def check_num_frames(value: int | None, preset: Preset) -> int:
    if value in (None, 0):  # gRPC's unset int32 is 0
        return preset.num_frames
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


def endless_frames(preset: Preset, fps: int, seconds: int, max_frames: int | None = None) -> int:
    """An endless session's cap: the most frames of whole chunks lasting at most `seconds` at
    `fps` (and at most `max_frames`), at least one chunk."""
    t, m = preset.vae.temporal_stride, preset.options.chunk_frames
    first, step = 1 + t * (m - 1), t * m
    limit = seconds * fps + 1 if max_frames is None else min(seconds * fps + 1, max_frames)
    return first + step * max(0, (limit - first) // step)


def resolve_session(
    body: SessionStart,
    preset: Preset,
    served_model: str,
    fps: int,
    max_prompt_chars: int,
    endless_cap: int | None = None,
) -> Generation:
    """A session request. Without `num_frames` (or 0, gRPC's unset) it is endless when
    `endless_cap` (its frame cap) is given, else the preset's default length."""
    endless = endless_cap is not None and body.num_frames in (None, 0)

    def length() -> tuple[int, str]:
        frames = endless_cap if endless else check_num_frames(body.num_frames, preset)
        return frames, str(math.ceil((frames - 1) / fps))

    generation = _resolve(body, preset, served_model, max_prompt_chars, length)
    mode = generation.shape.mode
    if endless and not mode.sliding_window:
        windowed = [name for name, m in MODES.items() if m.sliding_window]
        raise InvalidArgument(
            f"mode {mode.name!r} keeps every frame in its cache, so its sessions need "
            f"num_frames; endless sessions (no num_frames) run in {windowed}",
            param="num_frames",
        )
    return replace(generation, endless=endless)
