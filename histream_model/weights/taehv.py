"""Loading TAEHV-layout tiny decoders (`taew2_1.pth` / `.safetensors`): the state dict of a module
holding a `decoder` Sequential (and optionally an `encoder` one). The widths and temporal strides
are read off the tensor shapes; keys are then checked strictly (missing and extra ones listed)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from histream_model.taehv import TAEHV, TAEHVConfig
from histream_model.weights.common import StateDict, WeightsError, load_into

_SEQUENTIAL_KEY = re.compile(r"(decoder|encoder)\.\d+\.")
# Indices in the decoder Sequential: the first conv, each stage's TGrow and channel-changing conv.
_FIRST, _TGROWS, _STAGE_CONVS = 1, (7, 13, 19), (8, 14)
_TPOOLS = (2, 7, 12)  # in the encoder Sequential


def is_taehv_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True for TAEHV-layout keys (`decoder.<index>.*`); the Wan VAE's are named
    (`decoder.conv1.*`, `decoder.upsamples.*`)."""
    return any(_SEQUENTIAL_KEY.match(k) for k in state)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(
            f"TAEHV checkpoint {source!r} has no {key!r}; is it a taew2_1 (TAEHV layout) decoder?"
        )
    return tuple(state[key].shape)


def taehv_config(state: Mapping[str, torch.Tensor], source: str) -> TAEHVConfig:
    """The architecture read off a TAEHV-layout checkpoint's shapes."""
    first = _shape(state, f"decoder.{_FIRST}.weight", source)  # (c0, latent, 3, 3)
    widths = [first[0]] + [_shape(state, f"decoder.{i}.weight", source)[0] for i in _STAGE_CONVS]
    strides = []
    for i in _TGROWS:
        out, n = _shape(state, f"decoder.{i}.conv.weight", source)[:2]
        strides.append(out // n)
    config = TAEHVConfig(
        latent_channels=first[1],
        channels=tuple(widths),  # type: ignore[arg-type]
        time_strides=tuple(strides),  # type: ignore[arg-type]
    )
    if not any(k.startswith("encoder.") for k in state):
        return config
    n = _shape(state, "encoder.0.weight", source)[0]
    pools = []
    for i in _TPOOLS:
        out, inp = _shape(state, f"encoder.{i}.conv.weight", source)[:2]
        pools.append(inp // out)
    return TAEHVConfig(
        latent_channels=config.latent_channels,
        channels=config.channels,
        time_strides=config.time_strides,
        encoder_channels=n,
        encoder_time_strides=tuple(pools),  # type: ignore[arg-type]
        with_encoder=True,
    )


def load_taehv(
    state: StateDict,
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TAEHV:
    config = taehv_config(state, source)
    with torch.device("meta"):
        model = TAEHV(config)
    load_into(model, state, source)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
