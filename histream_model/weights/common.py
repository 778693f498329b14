"""Reading checkpoint files and checking their keys, shared by the DiT and VAE loaders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


def require_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{what} path {str(path)!r} does not exist")
    return p


def read_safetensors_dir(directory: Path) -> StateDict:
    """All tensors of a directory's safetensors file(s): single file or index-described shards."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors files in {str(directory)!r}")
    state: StateDict = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def read_torch_file(path: Path) -> object:
    """A .pt/.pth checkpoint on the CPU, tensors only (no pickled code is run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_config(directory: Path) -> dict:
    cfg = directory / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def rename_keys(state: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> StateDict:
    return {rename(k): v for k, v in state.items()}


def check_keys(expected: Iterable[str], got: Iterable[str], source: str) -> None:
    """Fail with both lists when a checkpoint's keys differ from the model's."""
    expected_set, got_set = set(expected), set(got)
    missing = sorted(expected_set - got_set)
    unexpected = sorted(got_set - expected_set)
    if missing or unexpected:
        parts = [f"checkpoint {source!r} does not match the model:"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected}")
        raise WeightsError(" ".join(parts))


def load_into(module: torch.nn.Module, state: StateDict, source: str) -> None:
    """Strictly load `state` (keys already in the module's naming), checking shapes too."""
    own = module.state_dict()
    check_keys(own.keys(), state.keys(), source)
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise WeightsError(f"checkpoint {source!r} has tensors of the wrong shape: {bad}")
    module.load_state_dict(state, strict=True, assign=True)
