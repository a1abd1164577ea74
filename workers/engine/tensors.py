"""Streams one shared tensor of every model as float32 row chunks, so memory is bounded by the chunk size and
the largest single tensor, never by the model."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

import torch

from workers.engine.checkpoint import Checkpoint
from workers.engine.errors import EngineError, ErrorCode

# Fixed, so that chunk-seeded randomness (DARE) gives the same bytes on every machine. Small enough that a
# chunk's working set stays near the CPU caches, large enough that per-op overhead is noise.
CHUNK_ELEMENTS = 1 << 18

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """`map` on the executor, in order, with at most `window` results in flight: memory stays bounded."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


@dataclass
class Chunk:
    """Rows of one tensor from the base and each task model, float32, on the engine's device; `models` is stacked
    [task, *rows]. A task pruned here (LwPTV) shows the base."""

    name: str
    index: int
    base: torch.Tensor
    models: torch.Tensor
    weights: list[float]
    seed: int
    start: int = 0  # flat index of the chunk's first entry in the whole tensor

    def task_vectors(self) -> torch.Tensor:
        """tau_k = theta_k - theta_0, stacked [task, *rows]; a new tensor the caller may modify."""
        return self.models - self.base

    def generator(self, task: int) -> torch.Generator:
        """A generator that depends only on (seed, tensor, chunk, task): independent of order and of threads."""
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{self.index}:{task}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class TensorSource:
    """One shared tensor across the base and the task models."""

    def __init__(self, name: str, base: Checkpoint, models: list[Checkpoint], own_names: list[str],
                 pruned: list[bool], weights: list[float], seed: int, check_finite: bool = False,
                 executor: Executor | None = None, window: int = 1, device: str = "cpu"):
        self.name = name
        self.shape = base.tensors[name].shape
        self.numel = math.prod(self.shape)
        self._base, self._models, self._own = base, models, own_names
        self.pruned = pruned
        self.weights = weights
        self._seed = seed
        self.check_finite = check_finite
        self._executor, self._window = executor, window
        self.device = torch.device(device)
        rows = self.shape[0] if self.shape else 0
        row_numel = self.numel // rows if rows else 0
        step = max(1, CHUNK_ELEMENTS // row_numel) if row_numel else max(rows, 1)
        self.row_ranges: list[tuple[int, int] | None] = (
            [(r, min(r + step, rows)) for r in range(0, rows, step)] if rows else [None])

    @property
    def n_tasks(self) -> int:
        return len(self._models)

    def _read(self, ckpt: Checkpoint, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        raw = ckpt.read(name, rows)
        if self.check_finite and raw.numel():
            low, high = torch.aminmax(raw)  # NaN propagates; far cheaper than isfinite().all()
            if not (torch.isfinite(low) and torch.isfinite(high)):
                bad = int((~torch.isfinite(raw)).sum())
                raise EngineError(ErrorCode.INVALID_CHECKPOINT,
                                  f"{ckpt.file_of[name]}: tensor {name!r} holds {bad} NaN or Inf value(s) in rows "
                                  f"{rows or 'all'}; a merge would spread them",
                                  {"tensor": name, "file": str(ckpt.file_of[name]), "non_finite": bad})
        return raw

    def chunk(self, index: int, tasks: list[int] | None = None) -> Chunk:
        rows = self.row_ranges[index]
        base = self._read(self._base, self.name, rows).to(self.device).float()
        wanted = list(range(self.n_tasks)) if tasks is None else tasks
        models = torch.empty((len(wanted), *base.shape), dtype=torch.float32, device=self.device)
        for i, k in enumerate(wanted):
            models[i].copy_(base if self.pruned[k] else self._read(self._models[k], self._own[k], rows))
        return Chunk(self.name, index, base, models, [self.weights[k] for k in wanted], self._seed,
                     self._start(rows))

    def chunks(self) -> Iterator[Chunk]:
        for i in range(len(self.row_ranges)):
            yield self.chunk(i)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Run `fn` over items on the engine's threads, results in order (chunks, tasks)."""
        return ordered_map(self._executor, fn, items, self._window)

    def map_chunks(self, fn: Callable[[Chunk], R]) -> Iterator[R]:
        """`fn(chunk)` for every chunk, read and computed on the engine's threads, results in order."""
        return self.map(lambda i: fn(self.chunk(i)), range(len(self.row_ranges)))

    def task_vector(self, task: int) -> torch.Tensor:
        """The whole task vector of one task, float32, flattened: for statistics over a full tensor."""
        if self.pruned[task]:
            return torch.zeros(self.numel, dtype=torch.float32)
        out = torch.empty(self.numel, dtype=torch.float32)
        for rows in self.row_ranges:
            shape = (rows[1] - rows[0], *self.shape[1:]) if rows else self.shape
            start = self._start(rows)
            part = out[start:start + math.prod(shape)].view(shape)
            part.copy_(self._read(self._models[task], self._own[task], rows))
            part.sub_(self._read(self._base, self.name, rows))
        return out

    def _start(self, rows: tuple[int, int] | None) -> int:
        """Flat index of the first entry of `rows`."""
        return rows[0] * (self.numel // self.shape[0]) if rows else 0
