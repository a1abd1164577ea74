"""Exact magnitude thresholds: the value of the k-th largest |x|, in one tensor (a partition) or over a whole task
vector (two streaming passes of bit-pattern histograms). What to do with entries tied at the threshold is the
caller's choice (see methods/ties.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from workers.engine.tensors import TensorSource

_BINS = 1 << 16
_ONE = torch.ones(1, dtype=torch.int64)


def _count(hist: torch.Tensor, bins: torch.Tensor) -> None:
    """hist[b] += occurrences of b. index_add_ matches bincount on large inputs and skips its fixed cost of
    allocating 65536 counters, which dominates for the many small tensors of a model."""
    hist.index_add_(0, bins, _ONE.expand(bins.numel()))


def keep_count(fraction: float, numel: int) -> int:
    """How many entries a density keeps: at least one of a non-empty tensor, as mergekit and the TIES code do."""
    if fraction >= 1.0:
        return numel
    if fraction <= 0.0 or numel == 0:
        return 0
    return max(1, int(fraction * numel))


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """k-th largest of a flat float32 tensor of non-negative values. Partitions `magnitudes` in place."""
    n = magnitudes.numel()
    if k <= 0:
        return float("inf")
    if k >= n:
        return 0.0
    a = magnitudes.numpy()
    a.partition(n - k)
    return float(a[n - k])


class StreamingKthLargest:
    """Exact k-th largest magnitudes of a stream too large to hold, in two passes with 2 x 65536 counters.

    Non-negative float32 values sort like their bit patterns as integers: pass one counts the high 16 bits, which
    finds the bucket holding the k-th largest; pass two counts the low 16 bits inside that bucket.
    """

    def __init__(self, counts: list[int]):
        self.counts = counts
        self.numel = 0
        self._hi = torch.zeros(_BINS, dtype=torch.int64)
        self._buckets: list[int] | None = None
        self._rank: list[int] = []
        self._lo: dict[int, torch.Tensor] = {}

    def first_pass(self, magnitudes: torch.Tensor) -> None:
        bits = magnitudes.reshape(-1).view(torch.int32)
        _count(self._hi, bits >> 16)
        self.numel += bits.numel()

    def end_first_pass(self) -> None:
        above = torch.flip(torch.cumsum(torch.flip(self._hi, [0]), 0), [0])  # above[b] = count in buckets >= b
        self._buckets, self._rank = [], []
        for k in self.counts:
            if 0 < k < self.numel:
                b = int(torch.nonzero(above >= k)[-1])
                self._buckets.append(b)
                self._rank.append(k - (int(above[b + 1]) if b + 1 < _BINS else 0))
                self._lo.setdefault(b, torch.zeros(_BINS, dtype=torch.int64))
            else:
                self._buckets.append(-1)
                self._rank.append(0)

    def needs_second_pass(self) -> bool:
        return bool(self._lo)

    def second_pass(self, magnitudes: torch.Tensor) -> None:
        bits = magnitudes.reshape(-1).view(torch.int32)
        hi = bits >> 16
        for b, hist in self._lo.items():
            _count(hist, bits[hi == b] & 0xFFFF)

    def thresholds(self) -> list[float]:
        out = []
        for k, b, r in zip(self.counts, self._buckets, self._rank, strict=True):
            if b < 0:
                out.append(float("inf") if k <= 0 else 0.0)
                continue
            lo = self._lo[b]
            above = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0])
            low = int(torch.nonzero(above >= r)[-1])
            pattern = np.array([(b << 16) | low], dtype=np.int32)
            out.append(float(pattern.view(np.float32)[0]))
        return out


def global_thresholds(sources: Sequence[TensorSource], fractions: list[float],
                      tick: Callable[[int], None]) -> list[float]:
    """Per task k, the magnitude threshold that keeps `fractions[k]` of the whole task vector tau_k (all shared
    tensors together), exactly, in two streaming passes. `tick(numel)` reports progress per chunk."""
    total = sum(s.numel for s in sources)
    selectors = [StreamingKthLargest([keep_count(f, total)]) for f in fractions]

    def sweep(feed: Callable[[StreamingKthLargest, torch.Tensor], None]) -> None:
        for source in sources:
            for magnitudes in source.map_chunks(lambda chunk: chunk.task_vectors().abs_().cpu()):
                for selector, mag in zip(selectors, magnitudes, strict=True):
                    feed(selector, mag)
                tick(magnitudes[0].numel())

    sweep(StreamingKthLargest.first_pass)
    for selector in selectors:
        selector.end_first_pass()
    if any(s.needs_second_pass() for s in selectors):
        sweep(lambda sel, mag: sel.second_pass(mag) if sel.needs_second_pass() else None)
    return [s.thresholds()[0] for s in selectors]
