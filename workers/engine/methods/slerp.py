"""Spherical linear interpolation between the base and one task model."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field

from workers.engine.methods import MergeMethod, MethodParams, register

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk, TensorSource


class SlerpParams(MethodParams):
    t: float = Field(default=0.5, ge=0.0, le=1.0, description="0 gives the base, 1 the task model.")
    dot_threshold: float = Field(default=0.9995, gt=0.0, le=1.0, description="Above this |cos|, interpolate "
                                 "linearly (nearly collinear tensors).")


def slerp_coefficients(norm_a: float, norm_b: float, dot: float, t: float,
                       dot_threshold: float, eps: float = 1e-8) -> tuple[float, float]:
    """Coefficients (c_a, c_b) with slerp(a, b) = c_a a + c_b b, from |a|, |b| and a.b."""
    cos = dot / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@register
class Slerp(MergeMethod):
    """theta = sin((1-t) Omega)/sin(Omega) theta_0 + sin(t Omega)/sin(Omega) theta_1, cos Omega = <theta_0, theta_1>
    / (|theta_0| |theta_1|), per tensor over all its entries; linear where |cos Omega| > dot_threshold.

    Shoemake (1985); mergekit's `slerp` (same threshold and epsilon). Takes exactly one task model.
    """

    name = "slerp"
    Params = SlerpParams
    min_models = 1
    max_models = 1

    def tensor_state(self, params: SlerpParams, source: TensorSource,
                     global_thresholds: list[float] | None) -> tuple[float, float]:
        sq_a = sq_b = dot = 0.0
        for chunk in source.chunks():
            a, b = chunk.base.double(), chunk.models[0].double()
            sq_a += float((a * a).sum())
            sq_b += float((b * b).sum())
            dot += float((a * b).sum())
        return slerp_coefficients(math.sqrt(sq_a), math.sqrt(sq_b), dot, params.t, params.dot_threshold)

    def merge(self, params: SlerpParams, chunk: Chunk, state: tuple[float, float]) -> torch.Tensor:
        c_a, c_b = state
        return c_a * chunk.base + c_b * chunk.models[0]
