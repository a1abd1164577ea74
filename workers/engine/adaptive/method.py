"""The base of adaptive methods (AdaMerging, Model Tinting): parameters they share, and the final merge, which
streams theta = theta_0 + sum_k lambda_{k,l} tau_{k,l} with the learned coefficients like any other method.
Torch-free at import, like every method module."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from workers.engine.methods import MergeMethod, MethodParams
from workers.engine.spec import DEFAULT_BLOCK_PATTERN

if TYPE_CHECKING:
    import torch

    from workers.engine.adaptive.loop import Adaptation, Adapted, AdaptRun, Objective
    from workers.engine.methods.ties import Cut
    from workers.engine.tensors import Chunk, TensorSource


class AdaptiveParams(MethodParams):
    granularity: Literal["task", "layer", "block"] = Field(
        default="layer", description="One coefficient per task (task-wise), per task and parameter tensor "
        "(layer-wise, the paper's), or per task and block of tensors named by `block_pattern`.")
    task_vectors: Literal["plain", "ties"] = Field(
        default="plain", description="Raw task vectors, or TIES-processed ones (trimmed per tensor to `density`, "
        "sign-elected): AdaMerging++.")
    density: float = Field(default=0.2, gt=0.0, le=1.0, description="TIES trim density (task_vectors: ties).")
    init: float = Field(default=0.3, ge=-10.0, le=10.0, allow_inf_nan=False, description="Initial coefficient.")
    clamp: bool = Field(default=True, description="Clamp coefficients to [0, 1] at every forward.")
    lr: float = Field(default=1e-3, gt=0.0, le=10.0, description="Adam learning rate.")
    steps: int = Field(default=500, ge=0, le=100_000, description="Optimiser steps.")
    batch_size: int = Field(default=16, ge=1, le=4096, description="Unlabeled inputs per task and step.")
    max_length: int = Field(default=128, ge=1, le=8192, description="Token limit for text inputs.")
    block_pattern: str = Field(default=DEFAULT_BLOCK_PATTERN, description="Regex whose group 1 names a tensor's "
                               "block (granularity: block); tensors that do not match are their own block.")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Task vectors on the device and the forward: auto is bfloat16 (autocast) on "
        "CUDA, float32 on the CPU.")
    save_every: int = Field(default=25, ge=1, description="Steps between saved states, from which a redelivered "
                            "job resumes.")

    @field_validator("block_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            if re.compile(v).groups < 1:
                raise ValueError("block_pattern needs a capturing group that names the block")
        except re.error as exc:
            raise ValueError(f"block_pattern is not a valid regex: {exc}") from exc
        return v


class AdaptiveMethod(MergeMethod):
    """Subclasses name their objective; the engine calls `adapt` once before merging, then the usual per-tensor
    hooks, which apply the learned coefficients."""

    uses_data: ClassVar[bool] = True
    Params: ClassVar[type[AdaptiveParams]]

    def __init__(self) -> None:
        self.adapted: Adapted | None = None
        self.cuts: dict[str, list[Cut]] = {}

    def objective(self, params: Any, adaptation: Adaptation) -> Objective:
        raise NotImplementedError

    def adapt(self, params: AdaptiveParams, run: AdaptRun) -> Adapted:
        from workers.engine.adaptive.loop import optimise

        self.adapted = optimise(self, params, run)
        return self.adapted

    def task_vector_cuts(self, params: AdaptiveParams, source: TensorSource) -> list[Cut] | None:
        """The TIES trim of this tensor's task vectors (AdaMerging++), computed once for optimising and merging."""
        if params.task_vectors != "ties":
            return None
        if source.name not in self.cuts:
            from workers.engine.methods.ties import per_tensor_cuts

            self.cuts[source.name] = per_tensor_cuts(source, params.density)
        return self.cuts[source.name]

    def tensor_state(self, params: AdaptiveParams, source: TensorSource,
                     global_thresholds: list[float] | None) -> tuple[list[float], list[Cut] | None]:
        assert self.adapted is not None, "adapt() runs before the merge"
        return self.adapted.coefficients_for(source.name), self.task_vector_cuts(params, source)

    def merge(self, params: AdaptiveParams, chunk: Chunk,
              state: tuple[list[float], list[Cut] | None]) -> torch.Tensor:
        coefficients, cuts = state
        taus = processed_task_vectors(chunk, cuts)
        out = chunk.base.clone()
        for lam, tau in zip(coefficients, taus, strict=True):
            if lam:
                out.add_(tau, alpha=lam)
        return out


def processed_task_vectors(chunk: Chunk, cuts: list[Cut] | None) -> torch.Tensor:
    """tau_k of a chunk, stacked; with `cuts`, TIES-trimmed and zeroed where they disagree with the elected sign."""
    taus = chunk.task_vectors()
    if cuts is None:
        return taus
    from workers.engine.methods.ties import agreement, trim

    trim(taus, cuts, chunk.start)
    return taus.mul_(agreement(taus, "sum"))
