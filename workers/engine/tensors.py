"""Streams one shared tensor of every model as float32 row chunks, so memory is bounded by the chunk size and
the largest single tensor, never by the model."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from workers.engine.checkpoint import Checkpoint
from workers.engine.errors import EngineError, ErrorCode

# Fixed, so that chunk-seeded randomness (DARE) gives the same bytes on every machine.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Chunk:
    """Rows of one tensor from the base and each task model, float32. A task pruned here (LwPTV) shows the base."""

    name: str
    index: int
    base: torch.Tensor
    models: list[torch.Tensor]
    weights: list[float]
    seed: int

    def task_vectors(self) -> list[torch.Tensor]:
        return [m - self.base for m in self.models]

    def generator(self, task: int) -> torch.Generator:
        """A generator that depends only on (seed, tensor, chunk, task): independent of order and of threads."""
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{self.index}:{task}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class TensorSource:
    """One shared tensor across the base and the task models."""

    def __init__(self, name: str, base: Checkpoint, models: list[Checkpoint], own_names: list[str],
                 pruned: list[bool], weights: list[float], seed: int, check_finite: bool = False):
        self.name = name
        self.shape = base.tensors[name].shape
        self.numel = math.prod(self.shape)
        self._base, self._models, self._own = base, models, own_names
        self.pruned = pruned
        self.weights = weights
        self._seed = seed
        self.check_finite = check_finite
        rows = self.shape[0] if self.shape else 0
        row_numel = self.numel // rows if rows else 0
        step = max(1, CHUNK_ELEMENTS // row_numel) if row_numel else max(rows, 1)
        self.row_ranges: list[tuple[int, int] | None] = (
            [(r, min(r + step, rows)) for r in range(0, rows, step)] if rows else [None])

    @property
    def n_tasks(self) -> int:
        return len(self._models)

    def _read(self, ckpt: Checkpoint, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        x = ckpt.read(name, rows).float()
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise EngineError(ErrorCode.INVALID_CHECKPOINT,
                              f"{ckpt.file_of[name]}: tensor {name!r} holds {bad} NaN or Inf value(s) in rows "
                              f"{rows or 'all'}; a merge would spread them", {"tensor": name,
                              "file": str(ckpt.file_of[name]), "non_finite": bad})
        return x

    def chunk(self, index: int, tasks: list[int] | None = None) -> Chunk:
        rows = self.row_ranges[index]
        base = self._read(self._base, self.name, rows)
        wanted = range(self.n_tasks) if tasks is None else tasks
        models = [base if self.pruned[k] else self._read(self._models[k], self._own[k], rows) for k in wanted]
        return Chunk(self.name, index, base, models, [self.weights[k] for k in wanted], self._seed)

    def chunks(self) -> Iterator[Chunk]:
        for i in range(len(self.row_ranges)):
            yield self.chunk(i)

    def task_vector(self, task: int) -> torch.Tensor:
        """The whole task vector of one task, float32, flattened: for statistics over a full tensor."""
        out = torch.empty(self.numel, dtype=torch.float32)
        position = 0
        for i in range(len(self.row_ranges)):
            chunk = self.chunk(i, [task])
            tau = (chunk.models[0] - chunk.base).reshape(-1)
            out[position:position + tau.numel()] = tau
            position += tau.numel()
        return out
