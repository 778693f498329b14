"""torch tensors <-> the stage protocol's `Tensor` message (raw bytes, bit-exact)."""

from __future__ import annotations

import hashlib

import torch

from histream_model.components import DTYPES
from protos.histream.v1 import stages_pb2


def to_proto(t: torch.Tensor) -> stages_pb2.Tensor:
    """A CPU copy of `t`'s exact bytes (little-endian, C order)."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot send dtype {t.dtype}; supported: {sorted(DTYPES)}")
    flat = t.detach().to("cpu").contiguous()
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return stages_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def from_proto(msg: stages_pb2.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    if msg.dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}; supported: {sorted(DTYPES)}")
    dtype = DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    expected = dtype.itemsize * int(torch.Size(shape).numel())
    if len(msg.data) != expected:
        raise ValueError(f"tensor {shape} {msg.dtype} needs {expected} bytes, got {len(msg.data)}")
    if not expected:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def digest(msg: stages_pb2.Tensor) -> str:
    """sha256 of a tensor message's bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256(msg.dtype.encode())
    h.update(repr(tuple(msg.shape)).encode())
    h.update(msg.data)
    return h.hexdigest()
