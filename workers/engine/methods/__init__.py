"""Method registry: one module per method, found by name; adding a method touches no other file.

Each module defines a pydantic parameter model and a `MergeMethod` subclass decorated with `@register`. Modules
import torch only inside the functions that compute, so the API can list methods and validate parameters
without torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from workers.engine.tensors import Chunk, TensorSource


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeMethod:
    """A merge method computes each merged tensor from float32 chunks of the base and the task models.

    `tensor_state` sees the whole tensor (streamed chunk by chunk) before `merge` sees its chunks, for methods
    that need a per-tensor statistic (a magnitude threshold, a norm). `global_fraction` asks the engine for the
    exact magnitude threshold of each whole task vector, computed in bounded memory before merging starts.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    uses_data: ClassVar[bool] = False  # adaptive methods learn from each task's unlabeled inputs

    def global_fraction(self, params: Any) -> float | None:
        return None

    def tensor_state(self, params: Any, source: TensorSource, global_thresholds: list[float] | None) -> Any:
        return None

    def merge(self, params: Any, chunk: Chunk, state: Any) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "summary": cls.summary(),
            "description": (cls.__doc__ or "").strip(),
            "models": {"min": cls.min_models, "max": cls.max_models},
            "uses_data": cls.uses_data,
            "parameters": cls.Params.model_json_schema(),
        }


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"merge method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


@cache
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def all_methods() -> dict[str, type[MergeMethod]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[MergeMethod]:
    methods = all_methods()
    if name not in methods:
        raise KeyError(f"unknown merge method {name!r}; available: {', '.join(methods)}")
    return methods[name]
