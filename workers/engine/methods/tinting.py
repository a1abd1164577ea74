"""Model Tinting: AdaMerging's coefficients plus one trainable layer per task, on the experts' pseudo-labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.engine.adaptive.method import AdaptiveMethod, AdaptiveParams
from workers.engine.methods import register

if TYPE_CHECKING:
    from workers.engine.adaptive.loop import Adaptation
    from workers.engine.adaptive.objectives import PseudoLabels


class TintingParams(AdaptiveParams):
    lr: float = Field(default=1e-2, gt=0.0, le=10.0, description="Adam learning rate (coefficients and tinted "
                      "layers).")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Unlabeled inputs per task and step.")
    tint: str = Field(default="head", min_length=1, description="The trainable layer of each task: `head` (its "
                      "task-specific tensors) or the name of one shared tensor in the base's naming.")
    confidence_filter: bool = Field(default=True, description="Keep a sample only where the expert and the merged "
                                    "model agree or the expert is at least as confident (Tinting++).")


@register
class Tinting(AdaptiveMethod):
    """Model Tinting: layer-wise coefficients and one tinted layer per task, trained on cross-entropy to the
    experts' confidence-filtered pseudo-labels.

    arXiv 2412.19098 (later versions titled SyMerge). Defaults as its public code: the tinted layer is each task's
    head, initialised from the expert's; Adam lr 1e-2 over coefficients and tinted layers; 32 inputs per task;
    coefficients clamped to [0, 1]. Differences: every task's loss is backpropagated in one step (the reference
    takes one optimiser step per task, in shuffled order); `steps` counts steps, not epochs. A shared tensor can
    be tinted instead of the head: each task then gets its own copy, written with its head under `heads/`.
    Each model needs `data`, as for AdaMerging.
    """

    name = "tinting"
    Params = TintingParams

    def objective(self, params: TintingParams, run: Adaptation) -> PseudoLabels:
        from workers.engine.adaptive.objectives import PseudoLabels

        return PseudoLabels(run, params.tint, params.confidence_filter)
