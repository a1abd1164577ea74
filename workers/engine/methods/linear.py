"""Weighted average of the task models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.engine.methods import MergeMethod, MethodParams, register

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk


class LinearParams(MethodParams):
    normalize: bool = True


@register
class Linear(MergeMethod):
    """Weighted average: theta = sum_k w_k theta_k / sum_k w_k (no division with normalize: false).

    Model soups (Wortsman et al., 2022, arXiv 2203.05482); mergekit's `linear`. The base is not part of the average;
    list it as a model to include it.
    """

    name = "linear"
    Params = LinearParams

    def merge(self, params: LinearParams, chunk: Chunk, state: None) -> torch.Tensor:
        out = sum(w * m for w, m in zip(chunk.weights, chunk.models, strict=True))
        total = sum(chunk.weights)
        if params.normalize and abs(total) > 1e-8:
            out = out / total
        return out
