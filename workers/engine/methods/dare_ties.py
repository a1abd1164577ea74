"""DARE then TIES sign election and disjoint merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from workers.engine.methods import MergeMethod, register
from workers.engine.methods.dare_linear import DareLinearParams, dare_all
from workers.engine.methods.ties import elect_and_merge

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk


class DareTiesParams(DareLinearParams):
    """DARE's parameters, TIES's sign election and disjoint merge, and TIES's default lambda."""

    lambda_: float = Field(default=1.0, alias="lambda", ge=-10.0, le=10.0, allow_inf_nan=False,
                           description="Scaling of the merged task vector.")
    consensus: Literal["sum", "count"] = "sum"
    merge: Literal["mean", "sum"] = "mean"


@register
class DareTies(MergeMethod):
    """theta = theta_0 + lambda * disjoint_merge(elect_sign(w_k DARE_p(tau_k))).

    DARE (arXiv 2311.03099) replaces TIES's magnitude trim by random drop and rescale; the sign election and the
    disjoint merge are TIES's (see `ties`). Defaults: p 0.5, sign by sum, disjoint mean, lambda 1 (mergekit's
    dare_ties sums instead of averaging: set merge: sum for that).
    """

    name = "dare_ties"
    Params = DareTiesParams

    def merge(self, params: DareTiesParams, chunk: Chunk, state: None) -> torch.Tensor:
        deltas = dare_all(chunk, params.drop_rate, params.rescale)
        merged = elect_and_merge(deltas, chunk.weights, params.consensus, params.merge)
        return merged.mul_(params.lambda_).add_(chunk.base)
