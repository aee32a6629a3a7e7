"""Streaming safetensors reader and writer with bfloat16 support.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw tensors. Reading memory-maps the
file and hands out one tensor at a time; writing streams tensor by tensor, so neither
holds a whole checkpoint in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file: `keys()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array view of the mapped file."""
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata=None) -> int:
    """Writes (name, array) pairs to `path` atomically; returns the bytes of tensor data.

    `tensors` may be a generator: each array is written and released before the next.
    The header needs every shape up front, so the pairs are first listed by shape
    only when given as a list; a generator is materialised one tensor at a time into a
    temporary data file and the header is prepended at the end.
    """
    tmp_data = path + ".data.tmp"
    header: dict = {"__metadata__": metadata or {"format": "np"}}
    offset = 0
    with open(tmp_data, "wb") as data:
        for name, array in tensors:
            array = np.ascontiguousarray(array)
            if array.dtype not in _NAMES:
                raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
            nbytes = array.nbytes
            header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                            "data_offsets": [offset, offset + nbytes]}
            data.write(array.tobytes())
            offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out, open(tmp_data, "rb") as data:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        while chunk := data.read(1 << 24):
            out.write(chunk)
    os.remove(tmp_data)
    os.replace(tmp, path)
    return offset
