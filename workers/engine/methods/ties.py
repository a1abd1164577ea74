"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

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


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of `tau` whose magnitude is below `threshold`."""
    return tau * (tau.abs() >= threshold)


def elect_and_merge(deltas: list[torch.Tensor], weights: list[float], consensus: str, mode: str) -> torch.Tensor:
    """Elect a sign per entry, then combine only the entries that agree with it.

    d_k = w_k * trimmed tau_k; sign = sgn(sum_k d_k) (or of sum_k sgn(d_k) for `count`), +1 where that is 0;
    mean: sum_k d_k [sgn d_k = sign] / sum_k w_k [sgn d_k = sign] (1 where nothing agrees); sum: the numerator.
    """
    import torch

    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    if consensus == "sum":
        elected = sum(weighted).sign()
    else:
        elected = sum(d.sign() for d in weighted).sign()
    elected[elected == 0] = 1
    numerator = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if mode == "mean" else None
    for w, d in zip(weights, weighted, strict=True):
        agree = d.sign() == elected
        numerator += d * agree
        if divisor is not None:
            divisor += w * agree
    if divisor is None:
        return numerator
    divisor[divisor == 0] = 1
    return numerator / divisor


def per_tensor_thresholds(source: TensorSource, density: float) -> list[float]:
    from workers.engine.selection import keep_count, kth_largest

    k = keep_count(density, source.numel)
    return [kth_largest(source.task_vector(t).abs_(), k) for t in range(source.n_tasks)]


@register
class Ties(MergeMethod):
    """TIES: theta = theta_0 + lambda * disjoint_merge(elect_sign(trim(w_k tau_k))).

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023, arXiv 2306.01708).
    Trim keeps the top `density` of |tau_k| per tensor (mergekit) or over the whole task vector (`scope: global`,
    the paper's code, computed exactly in two streaming passes). Defaults follow the paper: density 0.2,
    sign by sum, disjoint mean, lambda 1. With `merge: sum` and lambda 0.3 it is the AdaMerging code's "dis-sum".
    """

    name = "ties"
    Params = TiesParams

    def global_fraction(self, params: TiesParams) -> float | None:
        return params.density if params.scope == "global" else None

    def tensor_state(self, params: TiesParams, source: TensorSource,
                     global_thresholds: list[float] | None) -> list[float]:
        if params.scope == "global":
            assert global_thresholds is not None
            return global_thresholds
        return per_tensor_thresholds(source, params.density)

    def merge(self, params: TiesParams, chunk: Chunk, state: list[float]) -> torch.Tensor:
        trimmed = [trim(tau, thr) for tau, thr in zip(chunk.task_vectors(), state, strict=True)]
        merged = elect_and_merge(trimmed, chunk.weights, params.consensus, params.merge)
        return chunk.base + params.lambda_ * merged
