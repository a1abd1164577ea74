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
    shared: dict[str, str]         # parameter name -> base name of the merged tensor
    own: dict[str, torch.Tensor]   # parameter name -> the task's tensor (its head), float32 on the device
    accepted: set[str]             # input names the forward takes
    stored_as: dict[str, str]      # parameter name -> the checkpoint's name for it

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
        params = {p: ckpt.read(self.stored_as[p]).to(device=device, dtype=torch.float32) for p in self.shared}
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
    stored_as = _checkpoint_names(task, module)
    module.to("meta")
    base_of = {own: base for base, own in shared_names.items()}
    shared = {p: base_of[stored_as[p]] for p in params if stored_as[p] in base_of}
    absent = [stored_as[p] for p in params if p not in shared and stored_as[p] not in ckpt.tensors]
    if absent:
        raise _unsupported(task, f"{cls.__name__} has {len(absent)} parameter(s) the checkpoint lacks: "
                           f"{', '.join(absent[:LISTED])}", missing=absent)
    wrong = [p for p in params if tuple(ckpt.tensors[stored_as[p]].shape) != params[p]]
    if wrong:
        raise _unsupported(task, f"{len(wrong)} checkpoint tensor(s) do not fit {cls.__name__} built from its "
                           f"config.json: " + ", ".join(f"{stored_as[p]} {list(ckpt.tensors[stored_as[p]].shape)} "
                                                        f"vs {list(params[p])}" for p in wrong[:LISTED]),
                           mismatched=[stored_as[p] for p in wrong])
    own = {p: ckpt.read(stored_as[p]).to(device=device, dtype=torch.float32) for p in params if p not in shared}
    accepted = set(inspect.signature(module.forward).parameters)
    return TaskModel(task, config, module, buffers, shared, own, accepted, stored_as)


def _checkpoint_names(task: str, module: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> checkpoint name. transformers 5 renames some architectures' parameters on load and back
    on save (ViT's `encoder.layer.N.attention.attention.query` is `layers.N.attention.q_proj` in the module); the
    library's own save-time conversion, run on placeholders, says which checkpoint tensor each parameter is.
    Conversions that fuse or split tensors cannot be run tensor by tensor and are refused."""
    placeholders = {name: torch.empty(p.shape, device="meta") for name, p in module.named_parameters()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps checkpoint names
        return {name: name for name in placeholders}
    by_id = {id(t): name for name, t in placeholders.items()}
    converted = revert_weight_conversion(module, dict(placeholders))
    names = {by_id[id(t)]: stored for stored, t in converted.items() if id(t) in by_id}
    fused = sorted(set(placeholders) - set(names))
    if fused:
        raise _unsupported(task, f"{type(module).__name__} stores {len(fused)} parameter(s) fused or split in its "
                           f"checkpoints ({', '.join(fused[:LISTED])}); adaptive methods need one checkpoint tensor "
                           "per parameter", fused=fused)
    return names
