"""The optimisation shared by adaptive methods.

Efficient by construction: task vectors are held once on the device in the compute dtype; the merged tensors are
rebuilt in place once per step (no autograd through the merge); each task's forward and backward run in turn, so
graph memory does not grow with the number of tasks; the coefficients' gradient is then one dot product per tensor
and task, <dL/dtheta_l, tau_{k,l}>. The state is saved every few steps so that a redelivered job resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from workers.engine.adaptive.data import TaskData, load_task_data
from workers.engine.adaptive.memory import check_fits, out_of_memory
from workers.engine.adaptive.models import TaskModel, build_task_model
from workers.engine.checkpoint import Checkpoint
from workers.engine.errors import EngineError, ErrorCode
from workers.engine.tensors import TensorSource

if TYPE_CHECKING:
    from workers.engine.adaptive.method import AdaptiveMethod, AdaptiveParams

StepFn = Callable[[int, int, dict[str, Any]], None]  # (step done, steps, metrics); raising cancels


@dataclass
class AdaptRun:
    """What the engine hands an adaptive method: the shared tensors (LwPTV-pruned tasks already zeroed), the task
    checkpoints with their data, and where to keep a resumable state."""

    sources: list[TensorSource]
    checkpoints: list[Checkpoint]
    model_names: list[dict[str, str]]  # per task: base name -> the task's own name
    task_names: list[str]
    data: list[Path]
    tokenizer_folders: list[Path | None]
    device: torch.device
    seed: int
    fingerprint: str
    on_step: StepFn
    state_file: Path | None = None
    on_state_saved: Callable[[Path], None] | None = None


@dataclass
class Adapted:
    """What an adaptation learned: coefficients [task, group] (None where LwPTV pruned the whole group), the loss
    curve, and per-task tensors to write beside each task's head."""

    groups: list[str]
    group_of: dict[str, int]
    coefficients: list[list[float | None]]
    curve: list[dict[str, Any]]
    metric: str
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    resumed_from: int = 0

    def coefficients_for(self, tensor: str) -> list[float]:
        g = self.group_of[tensor]
        return [row[g] or 0.0 for row in self.coefficients]


class Objective(Protocol):
    """A method's loss. `trainables` are optimised with the coefficients; `overrides` replace parameters (own
    names) in the task's forward; `loss` returns the loss to backpropagate (None: nothing to learn from this batch)
    and the value to report; `heads` gives the tensors to write per task at the end."""

    metric: str

    def trainables(self) -> list[torch.Tensor]: ...
    def overrides(self, task: int) -> dict[str, torch.Tensor]: ...
    def loss(self, task: int, logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor | None, float]: ...
    def heads(self) -> dict[str, dict[str, torch.Tensor]]: ...


def group_names(names: list[str], granularity: str, block_pattern: str) -> tuple[list[str], dict[str, int]]:
    """Coefficient groups in first-appearance order, and the group of each shared tensor."""
    groups: list[str] = []
    group_of: dict[str, int] = {}
    for name in names:
        if granularity == "task":
            group = "all"
        elif granularity == "block":
            match = re.match(block_pattern, name)
            group = match.group(1) if match else name
        else:
            group = name
        if group not in groups:
            groups.append(group)
        group_of[name] = groups.index(group)
    return groups, group_of


class Adaptation:
    """The running state of one adaptation: task models, data, task vectors and merged tensors on the device."""

    def __init__(self, method: AdaptiveMethod, params: AdaptiveParams, run: AdaptRun):
        self.params, self.run, self.device = params, run, run.device
        self.n_tasks = len(run.task_names)
        cuda = self.device.type == "cuda"
        self.vector_dtype = torch.bfloat16 if params.compute_dtype == "bfloat16" or (
            params.compute_dtype == "auto" and cuda) else torch.float32
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and self.vector_dtype == torch.bfloat16
                         else contextlib.nullcontext())
        self.models: list[TaskModel] = [build_task_model(task, ckpt, names, self.device) for task, ckpt, names
                                        in zip(run.task_names, run.checkpoints, run.model_names, strict=True)]
        self.data: list[TaskData] = [
            load_task_data(path, task, model.config, model.accepted, folder, params.max_length)
            for path, task, model, folder in zip(run.data, run.task_names, self.models, run.tokenizer_folders,
                                                 strict=True)]
        names = [s.name for s in run.sources]
        self.groups, self.group_of = group_names(names, params.granularity, params.block_pattern)
        check_fits(sum(s.numel for s in run.sources), self.n_tasks, self.vector_dtype, self.device)
        self.mask = torch.zeros(self.n_tasks, len(self.groups), device=self.device)
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, torch.Tensor] = {}
        for source in run.sources:
            self._load(method, source)
            for k in range(self.n_tasks):
                if not source.pruned[k]:
                    self.mask[k, self.group_of[source.name]] = 1.0
        self.merged = {name: b.clone().requires_grad_() for name, b in self.base.items()}

    def _load(self, method: AdaptiveMethod, source: TensorSource) -> None:
        from workers.engine.adaptive.method import processed_task_vectors

        base = torch.empty(source.numel, dtype=torch.float32, device=self.device)
        taus = torch.empty((self.n_tasks, source.numel), dtype=self.vector_dtype, device=self.device)
        cuts = method.task_vector_cuts(self.params, source)

        def put(chunk: Any) -> None:
            n = chunk.base.numel()
            base[chunk.start:chunk.start + n] = chunk.base.reshape(-1)
            taus[:, chunk.start:chunk.start + n] = processed_task_vectors(chunk, cuts).reshape(self.n_tasks, -1)

        for _ in source.map_chunks(put):
            pass
        self.base[source.name] = base.view(source.shape)
        self.taus[source.name] = taus

    @torch.no_grad()
    def rebuild(self, lam: torch.Tensor) -> None:
        """merged_l = theta_0,l + sum_k lam[k, g(l)] tau_{k,l}, in place."""
        lam = lam * self.mask
        for name, merged in self.merged.items():
            merged.copy_(self.base[name])
            column = lam[:, self.group_of[name]].to(self.vector_dtype)
            merged.view(-1).add_((column @ self.taus[name]).float())

    def coefficient_grad(self) -> torch.Tensor:
        """dL/dlam[k, g] = sum over tensors l of group g of <dL/dmerged_l, tau_{k,l}>."""
        grad = torch.zeros(self.n_tasks, len(self.groups), device=self.device)
        for name, merged in self.merged.items():
            if merged.grad is not None:
                dot = self.taus[name] @ merged.grad.view(-1).to(self.vector_dtype)
                grad[:, self.group_of[name]] += dot.float()
        return grad * self.mask

    def batch_index(self, task: int, step: int) -> torch.Tensor:
        """Batch `step` of a task: consecutive slices of per-epoch permutations seeded by (seed, task, epoch), so
        a resumed run draws the same batches as an uninterrupted one."""
        n, size = len(self.data[task]), self.params.batch_size
        positions = range(step * size, step * size + min(size, n))
        return torch.stack([_permutation(self.run.seed, task, p // n, n)[p % n] for p in positions])

    def logits(self, task: int, index: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None,
               overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data[task].batch(index).items()}
        with self.autocast:
            return self.models[task].forward(self.merged if params is None else params, overrides or {},
                                             batch).float()

    def expert_outputs(self, task: int, chunk: int = 64) -> torch.Tensor:
        """The expert's logits on every input of its task, computed once (they never change)."""
        model = self.models[task]
        expert = model.expert_params(self.run.checkpoints[task], self.device)
        merged_view = {base: expert[own] for own, base in model.shared.items()}
        n = len(self.data[task])
        with torch.no_grad():
            return torch.cat([self.logits(task, torch.arange(i, min(i + chunk, n)), merged_view)
                              for i in range(0, n, chunk)])


@lru_cache(maxsize=64)
def _permutation(seed: int, task: int, epoch: int, n: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{task}:{epoch}".encode()).digest()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions, in nats."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def optimise(method: AdaptiveMethod, params: AdaptiveParams, run: AdaptRun) -> Adapted:
    adaptation = Adaptation(method, params, run)
    try:
        return _optimise(method, params, run, adaptation)
    except torch.OutOfMemoryError:
        raise out_of_memory(run.device, params.batch_size, params.max_length) from None


def _optimise(method: AdaptiveMethod, params: AdaptiveParams, run: AdaptRun, adaptation: Adaptation) -> Adapted:
    objective = method.objective(params, adaptation)
    coefficients = (torch.full_like(adaptation.mask, params.init) * adaptation.mask).requires_grad_()
    trainables = objective.trainables()
    optimizer = torch.optim.Adam([coefficients, *trainables], lr=params.lr)
    start, curve = _resume(run, optimizer, [coefficients, *trainables])
    tasks = run.task_names
    for step in range(start, params.steps):
        started = time.perf_counter()
        lam = coefficients.clamp(0.0, 1.0) if params.clamp else coefficients * 1.0
        adaptation.rebuild(lam.detach())
        optimizer.zero_grad(set_to_none=True)
        for merged in adaptation.merged.values():
            merged.grad = None
        values = {}
        for k, task in enumerate(tasks):
            index = adaptation.batch_index(k, step)
            loss, values[task] = objective.loss(k, adaptation.logits(k, index, overrides=objective.overrides(k)),
                                                index)
            if loss is not None:
                loss.backward()
        lam.backward(adaptation.coefficient_grad())
        optimizer.step()
        point = {"step": step + 1, "loss": round(check_finite(sum(values.values())), 6),
                 "tasks": {t: round(v, 6) for t, v in values.items()}}
        curve.append(point)
        if run.state_file is not None and ((step + 1) % params.save_every == 0 or step + 1 == params.steps):
            _save(run, optimizer, [coefficients, *trainables], step + 1, curve)
        run.on_step(step + 1, params.steps, {**point, "steps": params.steps, "metric": objective.metric,
                                             "step_s": round(time.perf_counter() - started, 4)})
    with torch.no_grad():
        final = (coefficients.clamp(0.0, 1.0) if params.clamp else coefficients).cpu()
        mask = adaptation.mask.cpu()
        table = [[float(final[k, g]) if mask[k, g] else None for g in range(len(adaptation.groups))]
                 for k in range(len(tasks))]
        adaptation.rebuild(final.to(adaptation.device))
        heads = objective.heads()
    return Adapted(adaptation.groups, adaptation.group_of, table, curve, objective.metric, heads, start)


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _resume(run: AdaptRun, optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]
            ) -> tuple[int, list[dict[str, Any]]]:
    """Load a saved state of the same adaptation (same fingerprint) if there is one; a foreign or unreadable
    state is ignored, never trusted."""
    path = run.state_file
    if path is None or not path.is_file():
        return 0, []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != run.fingerprint:
                return 0, []
            saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception:
        return 0, []
    if any(f"param.{i}" not in saved or saved[f"param.{i}"].shape != t.shape for i, t in enumerate(tensors)):
        return 0, []
    with torch.no_grad():
        for i, t in enumerate(tensors):
            t.copy_(saved[f"param.{i}"])
    state = optimizer.state_dict()
    state["state"] = {i: {key.split(".", 2)[2]: v.to(t.device) if key.split(".", 2)[2] != "step" else v
                          for key, v in saved.items() if key.startswith(f"adam.{i}.")}
                      for i, t in enumerate(tensors) if f"adam.{i}.exp_avg" in saved}
    optimizer.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["curve"])


def _save(run: AdaptRun, optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int,
          curve: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    assert run.state_file is not None
    out = {f"param.{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"adam.{i}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).cpu().contiguous()
    tmp = run.state_file.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"fingerprint": run.fingerprint, "step": str(step),
                                       "curve": json.dumps(curve)})
    os.replace(tmp, run.state_file)
    if run.on_state_saved is not None:
        run.on_state_saved(run.state_file)


def check_finite(loss: float) -> float:
    if not math.isfinite(loss):
        raise EngineError(ErrorCode.INVALID_PARAMETERS, f"the loss became {loss}; lower the learning rate",
                          {"loss": str(loss)})
    return loss
