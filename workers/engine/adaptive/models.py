"""Each task's own architecture, built with transformers from its config.json and run functionally: parameters
come from the merged tensors (shared) and the task's checkpoint (its head), so one set of merged tensors serves
every task and no model is ever copied per step."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.checkpoint import Checkpoint
from workers.engine.errors import EngineError, ErrorCode

LISTED = 10


def _unsupported(task: str, message: str, **detail: Any) -> EngineError:
    return EngineError(ErrorCode.UNSUPPORTED_MODEL, f"task {task!r}: {message}", {"task": task, **detail})


@dataclass
class TaskModel:
    task: str
    config: Any
    module: torch.nn.Module        # parameters on the meta device: every forward supplies them
    buffers: dict[str, torch.Tensor]
    shared: dict[str, str]         # own parameter name -> base name of the merged tensor
    own: dict[str, torch.Tensor]   # own parameter name -> the task's tensor (its head), float32 on the device
    accepted: set[str]             # input names the forward takes

    def forward(self, merged: Mapping[str, torch.Tensor], overrides: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the task's model over `batch` with the shared tensors from `merged` (base names) and
        `overrides` (own names) replacing any parameter."""
        params = {own: merged[base] for own, base in self.shared.items()}
        params.update(self.own)
        params.update(overrides)
        out = torch.func.functional_call(self.module, (params, self.buffers), args=(), kwargs=dict(batch))
        logits = getattr(out, "logits", None)
        if logits is None:
            raise _unsupported(self.task, f"{type(self.module).__name__} returns no logits; adaptive methods need "
                               "a model with a classification head (…ForSequenceClassification, "
                               "…ForImageClassification)")
        return logits

    def expert_params(self, ckpt: Checkpoint, device: torch.device) -> dict[str, torch.Tensor]:
        """The task's fine-tuned parameters as its checkpoint holds them, for the expert's own predictions."""
        params = {own: ckpt.read(own).to(device=device, dtype=torch.float32) for own in self.shared}
        return {**params, **self.own}


def build_task_model(task: str, ckpt: Checkpoint, shared_names: Mapping[str, str], device: torch.device
                     ) -> TaskModel:
    """`shared_names`: base name -> the task checkpoint's name, for every merged tensor."""
    import transformers

    folder = ckpt.folder
    if folder is None or not (folder / "config.json").is_file():
        raise _unsupported(task, "adaptive methods run the task's model, so its checkpoint must be a Hugging Face "
                           "folder with config.json (save it with save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _unsupported(task, f"config.json cannot be read by transformers: {exc}") from None
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise _unsupported(task, f"config.json names architecture {architectures[:1] or 'none'}, which this "
                           "transformers version does not have", architectures=architectures)
    with torch.device("cpu"):
        module = cls(config).eval()
    buffers = {name: b.to(device) for name, b in module.named_buffers()}
    params = {name: tuple(p.shape) for name, p in module.named_parameters()}
    module.to("meta")
    shared = {own: base for base, own in shared_names.items() if own in params}
    absent = [n for n in params if n not in shared and n not in ckpt.tensors]
    if absent:
        raise _unsupported(task, f"{cls.__name__} has {len(absent)} parameter(s) the checkpoint lacks: "
                           f"{', '.join(absent[:LISTED])}", missing=absent)
    wrong = [n for n in params if n in ckpt.tensors and tuple(ckpt.tensors[n].shape) != params[n]]
    if wrong:
        raise _unsupported(task, f"{len(wrong)} checkpoint tensor(s) do not fit {cls.__name__} built from its "
                           f"config.json: " + ", ".join(f"{n} {list(ckpt.tensors[n].shape)} vs {list(params[n])}"
                                                        for n in wrong[:LISTED]), mismatched=wrong)
    own = {n: ckpt.read(n).to(device=device, dtype=torch.float32) for n in params if n not in shared}
    accepted = set(inspect.signature(module.forward).parameters)
    return TaskModel(task, config, module, buffers, shared, own, accepted)
