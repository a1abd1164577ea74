"""DARE with task arithmetic: drop and rescale each task vector, then add."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.engine.methods import MergeMethod, MethodParams, register
from workers.engine.methods.task_arithmetic import add_task_vectors

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk


class DareLinearParams(MethodParams):
    drop_rate: float = Field(default=0.5, ge=0.0, lt=1.0, description="Probability p of dropping each entry.")
    rescale: bool = Field(default=True, description="Rescale survivors by 1/(1-p).")
    lambda_: float = Field(default=0.3, alias="lambda", ge=-10.0, le=10.0, allow_inf_nan=False,
                           description="Scaling of the summed task vectors.")


def dare(tau: torch.Tensor, drop_rate: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p; survivors times 1/(1-p) when rescaling (the paper, FusionBench)."""
    import torch

    keep = torch.rand(tau.shape, generator=generator) >= drop_rate  # drawn on the CPU: same bytes on any device
    out = tau * keep.to(tau.device)
    return out / (1.0 - drop_rate) if rescale else out


def dare_all(chunk: Chunk, drop_rate: float, rescale: bool) -> torch.Tensor:
    """DARE applied to every task vector of the chunk, stacked [task, ...]."""
    taus = chunk.task_vectors()
    for k in range(taus.shape[0]):
        taus[k] = dare(taus[k], drop_rate, rescale, chunk.generator(k))
    return taus


@register
class DareLinear(MergeMethod):
    """theta = theta_0 + lambda * sum_k w_k DARE_p(tau_k), DARE_p(tau) = tau * Bernoulli(1-p) / (1-p).

    Yu et al., "Language Models are Super Mario" (ICML 2024, arXiv 2311.03099). Rescaling by 1/(1-p) follows the
    paper and FusionBench; mergekit instead rescales to keep the L1 norm. The mask is drawn per (seed, tensor,
    chunk, task), so the same SPEC and seed give the same bytes. Default lambda 0.3 as task_arithmetic.
    """

    name = "dare_linear"
    Params = DareLinearParams

    def merge(self, params: DareLinearParams, chunk: Chunk, state: None) -> torch.Tensor:
        deltas = dare_all(chunk, params.drop_rate, params.rescale)
        return add_task_vectors(chunk.base, deltas, chunk.weights, params.lambda_)
