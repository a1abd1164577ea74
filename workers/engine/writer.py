"""Writes safetensors shards whose headers are fixed before any data: tensors stream in, row chunk by row chunk,
straight to their final offsets, and each file's sha256 is computed on the way (never read back)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.engine.checkpoint import SAFETENSORS_NAMES
from workers.engine.files import INDEX_FILE
from workers.engine.safetensors_format import DTYPE_SIZES


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[SAFETENSORS_NAMES[self.dtype]]


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the output folder
    sha256: str
    size: int


def shard_names(n: int, stem: str = "model") -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def plan_shards(entries: list[Planned], shard_bytes: int) -> list[list[Planned]]:
    """Greedy in order; a tensor larger than the shard size gets a shard of its own."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


class ShardedWriter:
    """Accepts tensors in plan order; `write` may be called several times per tensor with consecutive row chunks."""

    def __init__(self, folder: Path, entries: list[Planned], shard_bytes: int | None = None,
                 filename: str | None = None):
        self.folder = folder
        shards = plan_shards(entries, shard_bytes) if shard_bytes else [entries]
        names = [filename] if filename and len(shards) == 1 else shard_names(len(shards))
        self._queue = [(name, shard) for name, shard in zip(names, shards, strict=True)]
        self._sharded = len(shards) > 1
        self.weight_map = {e.name: name for name, shard in self._queue for e in shard}
        self.files: list[WrittenFile] = []
        self._pending: list[Planned] = []
        self._file = None
        self._remaining = 0
        self._total = sum(e.nbytes for e in entries)

    def _open_next(self) -> None:
        name, shard = self._queue.pop(0)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in shard:
            header[e.name] = {"dtype": SAFETENSORS_NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = (self.folder / name).open("wb")
        self._name = name
        self._hash = hashlib.sha256()
        self._size = 0
        self._put(len(raw).to_bytes(8, "little") + raw)
        self._pending = list(shard)

    def _put(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.files.append(WrittenFile(self._name, self._hash.hexdigest(), self._size))
            self._file = None

    def write(self, name: str, values: torch.Tensor) -> None:
        if self._remaining == 0:
            if not self._pending:
                self._close_current()
                self._open_next()
            entry = self._pending.pop(0)
            if entry.name != name:
                raise RuntimeError(f"writer expected tensor {entry.name!r}, got {name!r}")
            self._current, self._remaining = entry, entry.nbytes
        if name != self._current.name:
            raise RuntimeError(f"writer expected more of {self._current.name!r}, got {name!r}")
        data = values.to(self._current.dtype).cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._remaining:
            raise RuntimeError(f"{name}: {data.nbytes} bytes exceed the {self._remaining} left for this tensor")
        self._put(memoryview(data))
        self._remaining -= data.nbytes

    def close(self) -> list[WrittenFile]:
        if self._remaining or self._pending or self._queue:
            raise RuntimeError("writer closed before every planned tensor was written")
        self._close_current()
        if self._sharded:
            index = {"metadata": {"total_size": self._total}, "weight_map": self.weight_map}
            raw = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            (self.folder / INDEX_FILE).write_bytes(raw)
            self.files.append(WrittenFile(INDEX_FILE, hashlib.sha256(raw).hexdigest(), len(raw)))
        return self.files
