"""The losses adaptive methods optimise: prediction entropy (AdaMerging) and the experts' confidence-filtered
pseudo-labels with one tinted layer per task (Model Tinting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.adaptive.loop import Adaptation, entropy
from workers.engine.errors import EngineError, ErrorCode


class Entropy:
    """AdaMerging: the mean entropy of each task's predictions on its unlabeled inputs; the tasks' losses sum."""

    metric = "entropy"

    def trainables(self) -> list[torch.Tensor]:
        return []

    def overrides(self, task: int) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, task: int, logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        value = entropy(logits)
        return value, float(value.detach())

    def heads(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}


class PseudoLabels:
    """Model Tinting: cross-entropy of the merged model against each expert's argmax on the same inputs, keeping a
    sample where the two agree or where the expert is at least as confident as the merged model (the confidence
    filter). The experts' predictions never change, so they are computed once, before the first step.

    The tinted layer of a task is its head (initialised from the expert's head) or, for a shared tensor, a
    per-task residual on the merged tensor (initialised to 0), written as that task's own copy of the tensor.
    """

    metric = "cross_entropy"

    def __init__(self, adaptation: Adaptation, tint: str, confidence_filter: bool):
        self.a, self.tint, self.confidence_filter = adaptation, tint, confidence_filter
        self.labels, self.confidence = [], []
        for k in range(adaptation.n_tasks):
            confidence, labels = adaptation.expert_outputs(k).softmax(-1).max(-1)
            self.labels.append(labels)
            self.confidence.append(confidence)
        self.tinted: list[dict[str, torch.Tensor]] = []
        for model in adaptation.models:
            if tint == "head":
                if not model.own:
                    raise EngineError(ErrorCode.INVALID_PARAMETERS, f"task {model.task!r} has no task-specific "
                                      "tensors (head) to tint; name a shared tensor in `tint`", {"task": model.task})
                self.tinted.append({n: t.detach().clone().requires_grad_() for n, t in model.own.items()})
            else:
                if tint not in adaptation.merged:
                    listed = ", ".join(list(adaptation.merged)[:10])
                    raise EngineError(ErrorCode.INVALID_PARAMETERS, f"tint: {tint!r} is not a merged tensor "
                                      f"(base naming); for example {listed}", {"tint": tint})
                self.tinted.append({tint: torch.zeros_like(adaptation.merged[tint], requires_grad=True)})
        # Each task's parameter name for the tinted shared tensor, looked up once rather than at every step.
        self.tinted_name = [] if tint == "head" else [
            next(own for own, base in model.shared.items() if base == tint) for model in adaptation.models]

    def trainables(self) -> list[torch.Tensor]:
        return [t for tinted in self.tinted for t in tinted.values()]

    def overrides(self, task: int) -> dict[str, torch.Tensor]:
        if self.tint == "head":
            return self.tinted[task]
        return {self.tinted_name[task]: self.a.merged[self.tint] + self.tinted[task][self.tint]}

    def loss(self, task: int, logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        index = index.to(logits.device)
        labels = self.labels[task][index]
        if self.confidence_filter:
            with torch.no_grad():
                confidence, predicted = logits.softmax(-1).max(-1)
                keep = (predicted == labels) | (self.confidence[task][index] >= confidence)
            if not bool(keep.any()):
                return None, 0.0
            logits, labels = logits[keep], labels[keep]
        value = F.cross_entropy(logits, labels)
        return value, float(value.detach())

    def heads(self) -> dict[str, dict[str, torch.Tensor]]:
        with torch.no_grad():
            return {model.task: {model.stored_as[name]: t.detach().cpu() for name, t in self.overrides(k).items()}
                    for k, model in enumerate(self.a.models)}
