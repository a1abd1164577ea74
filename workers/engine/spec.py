"""The merge SPEC: one pydantic model serves the CLI (YAML/JSON file) and the API (a merge job's body)."""

from __future__ import annotations

import fnmatch
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from workers.engine.methods import MergeMethod, MethodParams, all_methods

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_TASK_SPECIFIC = ("classifier.*", "score.*", "qa_outputs.*", "heads.*")
DEFAULT_BLOCK_PATTERN = r"^(.*?\.(?:layers?|blocks?|h)\.\d+)\."
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '500MB' or '2GiB'."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"cannot read {value!r} as a size; write bytes or a number with KB/MB/GB/KiB/MiB/GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1024:
        raise ValueError(f"shard size {value!r} is below 1 KiB")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    model: str = Field(min_length=1, description="Checkpoint: a Hugging Face model folder or a .safetensors file.")
    name: str | None = Field(default=None,
                             description="Task name, used for heads/ and lwptv.json; default: from the path.")
    weight: float = Field(default=1.0, ge=0.0, description="Per-model weight (linear, task arithmetic, TIES, DARE).")
    data: str | None = Field(default=None, min_length=1, description="Unlabeled inputs of this task, for adaptive "
                             "methods (adamerging, tinting): JSONL with a `text` field per line, or a .safetensors "
                             "file of model inputs (input_ids with optional attention_mask, or pixel_values).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("a task name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    def task_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.model.rstrip("/")).name.removesuffix(".safetensors")
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:64]
        return cleaned or "model"


class Override(_Strict):
    match: str = Field(min_length=1, description="fnmatch pattern on tensor names in the base's naming.")
    parameters: dict[str, Any] = Field(min_length=1)

    def matches(self, tensor_name: str) -> bool:
        return fnmatch.fnmatchcase(tensor_name, self.match)


class LwPTVConfig(_Strict):
    """Layer-wise pruning of task vectors (arXiv 2506.09093), in the reading documented in `lwptv.py`."""

    score: Literal["saliency", "relative_norm"] = "saliency"
    q: float = Field(default=0.1, gt=0.0, le=1.0, description="Fraction of each task vector counted as salient.")
    eta: float = Field(ge=0.0, description="Layers scoring below eta are pruned. "
                       "Default 0.5 for saliency; required for relative_norm.")
    granularity: Literal["tensor", "block"] = "tensor"
    block_pattern: str = Field(default=DEFAULT_BLOCK_PATTERN, description="Regex whose group 1 names a tensor's "
                               "block; tensors that do not match are their own layer.")

    @field_validator("block_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"block_pattern is not a valid regex: {exc}") from exc
        if compiled.groups < 1:
            raise ValueError("block_pattern needs a capturing group that names the block")
        return v

    @model_validator(mode="before")
    @classmethod
    def _eta_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("eta") is None:
            if data.get("score") == "relative_norm":
                raise ValueError("lwptv.eta is required with score 'relative_norm' (its scale depends on the model)")
            data = {**data, "eta": 0.5}
        return data


class MergeSpec(_Strict):
    """What to merge, how, and how to write it."""

    method: str = Field(description="A registered merge method; see `mergeforge methods`.")
    base_model: str = Field(min_length=1, description="The pretrained checkpoint every task model was tuned from.")
    models: list[ModelRef] = Field(min_length=1, description="The fine-tuned task models.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")
    overrides: list[Override] = Field(default_factory=list, description="Per-tensor parameters; later ones win.")
    lwptv: LwPTVConfig | None = None
    task_specific: list[str] = Field(default_factory=lambda: list(DEFAULT_TASK_SPECIFIC),
                                     description="fnmatch patterns of tensors kept per task (heads), never merged.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="Output dtype of "
                                                                     "floating tensors; default: the base's.")
    shard_size: int | str = Field(default="5GB", description="Largest output shard, bytes or e.g. '2GB'.")
    seed: int = Field(default=0, ge=0, description="Seed of every random choice (DARE): same SPEC, same bytes.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        methods = all_methods()
        if v not in methods:
            raise ValueError(f"unknown merge method {v!r}; available: {', '.join(methods)}")
        return v

    @field_validator("parameters")
    @classmethod
    def _valid_parameters(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the method's model here, so an error points at `parameters.<name>`."""
        method = all_methods().get(info.data.get("method", ""))
        if method is not None:
            method.Params.model_validate(v)  # its ValidationError nests under `parameters`
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        parse_size(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MergeSpec:
        method = self.method_cls
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            wanted = (f"exactly {method.min_models}" if method.min_models == method.max_models
                      else f"at least {method.min_models}")
            raise ValueError(f"method {self.method!r} takes {wanted} task model(s), got {n}")
        if method.uses_data:
            lacking = [m.task_name() for m in self.models if not m.data]
            if lacking:
                raise ValueError(f"method {self.method!r} learns from each task's unlabeled inputs: set `data` on "
                                 f"every model (lacking: {', '.join(lacking)})")
            weighted = [m.task_name() for m in self.models if m.weight != 1.0]
            if weighted:
                raise ValueError(f"method {self.method!r} learns the weights; remove `weight` from "
                                 f"{', '.join(weighted)}")
        elif any(m.data for m in self.models):
            raise ValueError(f"method {self.method!r} uses no data; `data` is for adaptive methods "
                             "(adamerging, tinting)")
        names = [m.task_name() for m in self.models]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)} (set `name` on each model)")
        for i, override in enumerate(self.overrides):
            try:
                method.Params.model_validate({**self.parameters, **override.parameters})
            except ValidationError as exc:
                raise ValueError(f"overrides[{i}] ({override.match!r}): {_first_error(exc)}") from None
        return self

    @cached_property
    def method_cls(self) -> type[MergeMethod]:
        return all_methods()[self.method]

    @cached_property
    def method_params(self) -> MethodParams:
        try:
            return self.method_cls.Params.model_validate(self.parameters)
        except ValidationError as exc:
            raise ValueError(f"parameters: {_first_error(exc)}") from None

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def params_for(self, tensor_name: str) -> MethodParams:
        """The method's parameters for one tensor: the SPEC's, updated by every override that matches."""
        updates: dict[str, Any] = {}
        for override in self.overrides:
            if override.matches(tensor_name):
                updates.update(override.parameters)
        if not updates:
            return self.method_params
        return self.method_cls.Params.model_validate({**self.parameters, **updates})

    def is_task_specific(self, tensor_name: str) -> bool:
        return any(fnmatch.fnmatchcase(tensor_name, p) for p in self.task_specific)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def load_spec(path: str | Path) -> MergeSpec:
    """Read a SPEC from YAML or JSON (JSON is YAML); relative checkpoint paths are taken from the SPEC's folder."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a SPEC is a mapping with method, base_model and models")
    folder = path.parent
    def resolve(p: Any) -> Any:
        if isinstance(p, str) and "://" not in p and not Path(p).is_absolute():
            return str((folder / p).resolve())
        return p
    data["base_model"] = resolve(data.get("base_model"))
    for m in data.get("models") or []:
        if isinstance(m, dict):
            m["model"] = resolve(m.get("model"))
            if m.get("data") is not None:
                m["data"] = resolve(m["data"])
    return MergeSpec.model_validate(data)
