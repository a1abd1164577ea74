"""Reads and checks safetensors headers without torch: the engine and the API's header-only registration share it.

A header that lies (offsets past the end of the file, sizes that do not match shape and dtype, holes or
overlaps) is refused with a message naming the file and the tensor, before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from workers.engine.errors import EngineError, ErrorCode

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    file: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _bad(path: str, what: str) -> EngineError:
    return EngineError(ErrorCode.INVALID_CHECKPOINT, f"{path}: {what}", {"file": path})


def read_header(stream: BinaryIO, file_size: int, path: str) -> Header:
    """Parse and check the header of a safetensors stream of `file_size` bytes (a file or a ranged S3 read)."""
    if file_size == 0:
        raise _bad(path, "the file is empty (0 bytes); it is not a safetensors file")
    if file_size < 8:
        raise _bad(path, f"the file holds {file_size} bytes, fewer than the 8-byte header length; truncated?")
    (header_len,) = struct.unpack("<Q", stream.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {header_len} exceeds {MAX_HEADER_BYTES} bytes; not a safetensors file?")
    if 8 + header_len > file_size:
        raise _bad(path, f"header says it is {header_len} bytes but the file holds only {file_size - 8} after "
                         "the length; truncated?")
    raw = stream.read(header_len)
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc}); not a safetensors file?") from None
    if not isinstance(parsed, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not a JSON object")
    data_start = 8 + header_len
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in parsed.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _bad(path, f"tensor {name!r}: entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _bad(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _bad(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise _bad(path, f"tensor {name!r}: header gives {end - begin} bytes for shape {shape} {dtype}, "
                             f"which needs {expected}")
        if begin < 0 or end > data_len:
            raise _bad(path, f"tensor {name!r}: bytes {begin}..{end} lie past the end of the data "
                             f"({data_len} bytes); the file is truncated or its header lies")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin, path)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a hole at byte {position}"
            raise _bad(path, f"tensor {name!r}: bytes {begin}..{end} {what}; the header lies")
        position = end
    if position != data_len:
        raise _bad(path, f"the data section holds {data_len} bytes but the tensors cover {position}")
    return Header(tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def read_header_file(path: str | Path) -> Header:
    path = Path(path)
    with path.open("rb") as f:
        return read_header(f, os.fstat(f.fileno()).st_size, str(path))
