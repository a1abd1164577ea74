"""Decides, from headers alone, which tensors are merged, copied from the base, or kept per task, and refuses
incompatible checkpoints with every problem listed before any tensor data is read. Torch-free: the API runs the
same check at submit time on registered checkpoints' headers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from workers.engine.errors import EngineError, ErrorCode
from workers.engine.safetensors_format import TensorInfo
from workers.engine.spec import MergeSpec

LISTED = 20  # names shown per problem in a message; `detail` has them all


@dataclass(frozen=True)
class Alignment:
    """Maps a task model's tensor names onto the base's: strip `strip` from the model's names, then add `add`.

    Task models saved by `AutoModelForXxx` from a bare base carry a prefix (`bert.encoder...` vs `encoder...`);
    the reverse happens when the base is the wrapped one.
    """

    strip: str = ""
    add: str = ""

    def to_base(self, name: str) -> str | None:
        if not name.startswith(self.strip):
            return None
        return self.add + name[len(self.strip):]


def align(base_names: set[str], model_names: set[str]) -> Alignment:
    scores: Counter[Alignment] = Counter({Alignment(): len(base_names & model_names)})
    for name in model_names:
        for i, ch in enumerate(name):
            if ch == "." and name[i + 1:] in base_names:
                scores[Alignment(strip=name[: i + 1])] += 1
    for name in base_names:
        for i, ch in enumerate(name):
            if ch == "." and name[i + 1:] in model_names:
                scores[Alignment(add=name[: i + 1])] += 1
    # Most matches wins; on a tie, the identity, then the shortest prefix.
    return max(scores, key=lambda a: (scores[a], a == Alignment(), -len(a.strip) - len(a.add)))


@dataclass(frozen=True)
class Layout:
    shared: list[str]            # base names merged across models, in storage order; the rest are copied
    model_names: list[dict[str, str]]  # per task model: base name -> that model's own name, for shared tensors
    heads: list[list[str]]       # per task model: its own names of its task-specific tensors


def storage_order(tensors: dict[str, TensorInfo]) -> list[str]:
    """Names in file and offset order: reading them in this order is sequential."""
    return sorted(tensors, key=lambda n: (tensors[n].file, tensors[n].start))


def plan_layout(spec: MergeSpec, base: dict[str, TensorInfo], models: list[dict[str, TensorInfo]]) -> Layout:
    """`base` and each of `models`: tensor name -> header info."""
    base_names = set(base)
    order = storage_order(base)
    shared = [n for n in order if base[n].is_float and not spec.is_task_specific(n)]
    model_names, heads = [], []
    missing: dict[str, list[str]] = {}
    mismatched: list[dict] = []
    for ref, tensors in zip(spec.models, models, strict=True):
        alignment = align(base_names, set(tensors))
        own = {}
        for name in tensors:
            canonical = alignment.to_base(name)
            if canonical is not None and canonical in base_names:
                own[canonical] = name
        task = ref.task_name()
        absent = [n for n in shared if n not in own]
        if absent:
            missing[task] = absent
        for n in shared:
            if n in own:
                info = tensors[own[n]]
                if info.shape != base[n].shape or not info.is_float:
                    mismatched.append({"tensor": n, "model": task, "shape": list(info.shape), "dtype": info.dtype,
                                       "base_shape": list(base[n].shape)})
        model_names.append({n: own[n] for n in shared if n in own})
        heads.append([name for name in tensors
                      if (c := alignment.to_base(name)) is None or c not in base_names or spec.is_task_specific(c)])
    problems = []
    for task, names in missing.items():
        problems.append(f"model {task!r} lacks {len(names)} tensor(s) the base has: {_names(names)}")
    if mismatched:
        listed = ", ".join(f"{m['tensor']} (base {m['base_shape']}, {m['model']} {m['shape']} {m['dtype']})"
                           for m in mismatched[:LISTED])
        more = f" and {len(mismatched) - LISTED} more" if len(mismatched) > LISTED else ""
        problems.append(f"{len(mismatched)} tensor(s) differ in shape or are not floating point: {listed}{more}. "
                        "If these are task heads, list them in `task_specific`")
    if problems:
        raise EngineError(ErrorCode.INCOMPATIBLE_CHECKPOINTS, "incompatible checkpoints: " + "; ".join(problems),
                          {"missing": missing, "mismatched": mismatched})
    return Layout(shared, model_names, heads)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return ", ".join(names[:LISTED]) + more
