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


def trim(taus: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Zero, in place, the entries of each task's tau ([task, ...]) whose magnitude is below its threshold."""
    import torch

    limits = torch.tensor(thresholds, dtype=taus.dtype).view(-1, *[1] * (taus.dim() - 1))
    return taus.mul_(taus.abs() >= limits)


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


def per_tensor_thresholds(source: TensorSource, density: float) -> list[float]:
    from workers.engine.selection import keep_count, kth_largest

    k = keep_count(density, source.numel)
    return list(source.map(lambda t: kth_largest(source.task_vector(t).abs_(), k), range(source.n_tasks)))


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
        trimmed = trim(chunk.task_vectors(), state)
        merged = elect_and_merge(trimmed, chunk.weights, params.consensus, params.merge)
        return merged.mul_(params.lambda_).add_(chunk.base)
