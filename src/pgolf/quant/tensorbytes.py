"""Tensors as little-endian bytes for the artifact: dtype names, plain layout and byte planes.

`planes` stores an array of itemsize k as all its first bytes, then all its second bytes, ... (the byte
shuffle of SPEC §4.6 with stride k), so the slowly varying exponent bytes of fp16 values sit together.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """All bytes at offsets ≡ 0 (mod stride), then ≡ 1, ... (the records' BSHF transform without its tag)."""
    return b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    out = bytearray(len(data))
    pos = 0
    for i in range(stride):
        count = len(range(i, len(data), stride))
        out[i::stride] = data[pos : pos + count]
        pos += count
    return bytes(out)


def to_bytes(t: torch.Tensor, layout: str) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
    else:
        arr = t.numpy()
    raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return byte_shuffle(raw, arr.itemsize) if layout == "planes" else raw


def from_bytes(buf: bytes, storage: str, shape: list[int], layout: str) -> torch.Tensor:
    dtype = DTYPES[storage]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if layout == "planes":
        buf = byte_unshuffle(buf, itemsize)
    if dtype == torch.bfloat16:
        arr = np.frombuffer(buf, dtype="<i2").copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = np.dtype(torch.empty((), dtype=dtype).numpy().dtype).newbyteorder("<")
    arr = np.frombuffer(buf, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(arr.copy()).reshape(shape)
