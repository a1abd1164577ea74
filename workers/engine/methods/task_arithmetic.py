"""Task arithmetic: add the scaled sum of task vectors to the base."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.engine.methods import MergeMethod, MethodParams, register

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(default=0.3, alias="lambda", ge=-10.0, le=10.0, allow_inf_nan=False,
                           description="Scaling of the summed task vectors.")


def add_task_vectors(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float],
                     scale: float) -> torch.Tensor:
    out = base.clone()
    for w, d in zip(weights, deltas, strict=True):
        out.add_(d, alpha=scale * w)
    return out


@register
class TaskArithmetic(MergeMethod):
    """theta = theta_0 + lambda * sum_k w_k tau_k, with tau_k = theta_k - theta_0.

    Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023, arXiv 2212.04089). Default lambda 0.3 as in
    the AdaMerging and FusionBench code; mergekit defaults to 1.0.
    """

    name = "task_arithmetic"
    Params = TaskArithmeticParams

    def merge(self, params: TaskArithmeticParams, chunk: Chunk, state: None) -> torch.Tensor:
        return add_task_vectors(chunk.base, chunk.task_vectors(), chunk.weights, params.lambda_)
