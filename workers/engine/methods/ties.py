"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from workers.engine.methods import MergeMethod, MethodParams, register

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk, TensorSource


class TiesParams(MethodParams):
    density: float = Field(default=0.2, gt=0.0, le=1.0, description="Fraction of each task vector kept by magnitude.")
    lambda_: float = Field(default=1.0, alias="lambda", ge=-10.0, le=10.0, allow_inf_nan=False,
                           description="Scaling of the merged task vector.")
    consensus: Literal["sum", "count"] = Field(default="sum", description="Elect the sign of the weighted sum "
                                               "(TIES paper) or of the majority count.")
    merge: Literal["mean", "sum"] = Field(default="mean", description="Disjoint mean (TIES paper, mergekit) or "
                                          "disjoint sum (AdaMerging code).")
    scope: Literal["tensor", "global"] = Field(default="tensor", description="Rank magnitudes within each tensor "
                                               "(mergekit) or over the whole task vector (TIES paper code).")


@dataclass(frozen=True)
class Cut:
    """What trim keeps of one task vector: every |tau| above `threshold`, and entries equal to it up to flat index
    `last_tie`, so that exactly k entries survive even when magnitudes tie (common with bf16 checkpoints)."""

    threshold: float
    last_tie: int = sys.maxsize


def trim(taus: torch.Tensor, cuts: list[Cut], start: int = 0) -> torch.Tensor:
    """Zero, in place, what each task's cut drops; `taus` is [task, ...], its entries start at flat `start`."""
    import torch

    numel = taus[0].numel()
    for tau, cut in zip(taus, cuts, strict=True):
        magnitudes = tau.abs()
        if cut.last_tie >= start + numel - 1:
            keep = magnitudes >= cut.threshold
        elif cut.last_tie < start:
            keep = magnitudes > cut.threshold
        else:
            before_cut = (torch.arange(numel) <= cut.last_tie - start).view(tau.shape)
            keep = (magnitudes > cut.threshold) | ((magnitudes == cut.threshold) & before_cut)
        tau.mul_(keep)
    return taus


def elect_and_merge(deltas: torch.Tensor, weights: list[float], consensus: str, mode: str) -> torch.Tensor:
    """Elect a sign per entry, then combine only the entries that agree with it. `deltas` is [task, ...].

    d_k = w_k * trimmed tau_k; sign = sgn(sum_k d_k) (or of sum_k sgn(d_k) for `count`), +1 where that is 0;
    mean: sum_k d_k [sgn d_k = sign] / sum_k w_k [sgn d_k = sign] (1 where nothing agrees); sum: the numerator.
    """
    import torch

    unit = all(w == 1.0 for w in weights)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas if unit else deltas * w
    score = weighted.sum(0) if consensus == "sum" else weighted.sign().sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    agree = (weighted * elected) > 0
    numerator = (weighted * agree).sum(0)
    if mode == "sum":
        return numerator
    divisor = agree.sum(0, dtype=deltas.dtype) if unit else (w * agree).sum(0)
    return numerator / torch.where(divisor == 0, 1.0, divisor)


def per_tensor_cuts(source: TensorSource, density: float) -> list[Cut]:
    """Exactly k = keep_count(density) entries of each task vector of this tensor, the largest by magnitude; ties
    at the threshold are broken by position (mergekit's argsort breaks them arbitrarily)."""
    from workers.engine.selection import keep_count, kth_largest

    k = keep_count(density, source.numel)

    def one(task: int) -> Cut:
        magnitudes = source.task_vector(task).abs_()
        threshold = kth_largest(magnitudes, k)  # reorders `magnitudes`
        if k <= 0 or k >= source.numel:
            return Cut(threshold)
        above = int((magnitudes > threshold).count_nonzero())
        ties = int((magnitudes == threshold).count_nonzero())
        if above + ties == k:
            return Cut(threshold)
        return Cut(threshold, _nth_tie(source, task, threshold, k - above))

    return list(source.map(one, range(source.n_tasks)))


def _nth_tie(source: TensorSource, task: int, threshold: float, n: int) -> int:
    """Flat index of the n-th entry (1-based, in storage order) whose magnitude equals `threshold`."""
    seen = 0
    for i in range(len(source.row_ranges)):
        chunk = source.chunk(i, [task])
        equal = (chunk.task_vectors()[0].abs_() == threshold).reshape(-1)
        count = int(equal.count_nonzero())
        if seen + count >= n:
            return chunk.start + int(equal.nonzero()[n - seen - 1])
        seen += count
    raise AssertionError("fewer ties than counted")


@register
class Ties(MergeMethod):
    """TIES: theta = theta_0 + lambda * disjoint_merge(elect_sign(trim(w_k tau_k))).

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023, arXiv 2306.01708).
    Trim keeps the top `density` of |tau_k| per tensor (mergekit; exactly k entries, ties at the threshold broken
    by position) or over the whole task vector (`scope: global`, the paper's code: every entry >= the exact k-th
    largest magnitude, found in two streaming passes). Defaults follow the paper: density 0.2,
    sign by sum, disjoint mean, lambda 1. With `merge: sum` and lambda 0.3 it is the AdaMerging code's "dis-sum".
    """

    name = "ties"
    Params = TiesParams

    def global_fraction(self, params: TiesParams) -> float | None:
        return params.density if params.scope == "global" else None

    def tensor_state(self, params: TiesParams, source: TensorSource,
                     global_thresholds: list[float] | None) -> list[Cut]:
        if params.scope == "global":
            assert global_thresholds is not None
            return [Cut(t) for t in global_thresholds]
        return per_tensor_cuts(source, params.density)

    def merge(self, params: TiesParams, chunk: Chunk, state: list[Cut]) -> torch.Tensor:
        trimmed = trim(chunk.task_vectors(), state, chunk.start)
        merged = elect_and_merge(trimmed, chunk.weights, params.consensus, params.merge)
        return merged.mul_(params.lambda_).add_(chunk.base)
