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
    """Zero, in place, what each task's cut drops; `taus` is [task, ...], its entries start at flat index `start`.

    hardshrink keeps |x| > lambda; with lambda the float32 just below the threshold it keeps |x| >= threshold.
    It is one pass, where a bool mask and a multiply take three and bool tensors are slow on CPU.
    """
    import numpy as np
    import torch

    flat = taus.view(taus.shape[0], -1)
    numel = flat.shape[1]
    for k, cut in enumerate(cuts):
        threshold = np.float32(cut.threshold)
        at_or_above = float(np.nextafter(threshold, np.float32(-np.inf)))
        split = min(max(cut.last_tie - start + 1, 0), numel)  # leading entries where ties are kept
        for part, lam in ((flat[k, :split], at_or_above), (flat[k, split:], float(threshold))):
            if part.numel():
                torch.ops.aten.hardshrink.out(part, lam, out=part)
    return taus


def agreement(d: torch.Tensor, consensus: str) -> torch.Tensor:
    """1.0 where d_k (stacked [task, ...]) has the elected sign, else 0.0; the elected sign is that of sum_k d_k
    (or of sum_k sgn(d_k) for `count`), +1 where that is 0."""
    import torch

    agree = d.sign()
    score = d.sum(0) if consensus == "sum" else agree.sum(0)
    elected = torch.ones_like(score).copysign_(score.add_(0.0))  # +1 where the score is 0 (or -0)
    return agree.mul_(elected).clamp_(min=0)


def elect_and_merge(deltas: torch.Tensor, weights: list[float], consensus: str, mode: str) -> torch.Tensor:
    """Elect a sign per entry, then combine only the entries that agree with it. `deltas` is [task, ...] and is
    overwritten.

    d_k = w_k * trimmed tau_k; sign = sgn(sum_k d_k) (or of sum_k sgn(d_k) for `count`), +1 where that is 0;
    mean: sum_k d_k [sgn d_k = sign] / sum_k w_k [sgn d_k = sign] (0 where nothing agrees); sum: the numerator.
    Float arithmetic only (bool masks are slow on CPU), summed in task order as mergekit does.
    """
    import torch

    unit = all(w == 1.0 for w in weights)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *[1] * (deltas.dim() - 1))
    d = deltas if unit else deltas.mul_(w)
    agree = agreement(d, consensus)
    numerator = d.mul_(agree).sum(0)
    if mode == "sum":
        return numerator
    divisor = agree.sum(0) if unit else agree.mul_(w).sum(0)
    # Nothing agrees only where the numerator is 0 (agreeing entries have weight > 0): 0 / tiny = 0.
    return numerator.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))


def per_tensor_cuts(source: TensorSource, density: float) -> list[Cut]:
    """Exactly k = keep_count(density) entries of each task vector of this tensor, the largest by magnitude; ties
    at the threshold are broken by position (mergekit's argsort breaks them arbitrarily)."""
    from workers.engine.selection import keep_count, kth_largest

    k = keep_count(density, source.numel)

    def one(task: int) -> Cut:
        magnitudes = source.task_vector(task).abs_()
        threshold = kth_largest(magnitudes, k)  # partitions: the k largest now sit at the end
        if k <= 0 or k >= source.numel:
            return Cut(threshold)
        kept, rest = magnitudes[source.numel - k:], magnitudes[:source.numel - k]
        if float(rest.max()) < threshold:  # no tie beyond the k kept: >= threshold keeps exactly k
            return Cut(threshold)
        above = int((kept > threshold).count_nonzero())
        return Cut(threshold, _nth_tie(source, task, threshold, k - above))

    return list(source.map(one, range(source.n_tasks)))


def _nth_tie(source: TensorSource, task: int, threshold: float, n: int) -> int:
    """Flat index of the n-th entry (1-based, in storage order) whose magnitude equals `threshold`; reads the
    tensor again only up to that entry."""
    import numpy as np

    target = np.float32(threshold)
    seen = 0
    for i in range(len(source.row_ranges)):
        chunk = source.chunk(i, [task])
        ties = np.flatnonzero(chunk.task_vectors()[0].abs_().cpu().numpy().reshape(-1) == target)
        if seen + ties.size >= n:
            return chunk.start + int(ties[n - seen - 1])
        seen += ties.size
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
