"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled task inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workers.engine.adaptive.method import AdaptiveMethod, AdaptiveParams
from workers.engine.methods import register

if TYPE_CHECKING:
    from workers.engine.adaptive.loop import Adaptation
    from workers.engine.adaptive.objectives import Entropy


class AdaMergingParams(AdaptiveParams):
    pass


@register
class AdaMerging(AdaptiveMethod):
    """AdaMerging: theta_l = theta_0,l + sum_k lambda_{k,l} tau_{k,l}, lambda learned to minimise the entropy of
    each task's predictions on its unlabeled inputs.

    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024, arXiv 2310.02575).
    Defaults as the paper's code: layer-wise (one coefficient per task and parameter tensor), init 0.3, clamped to
    [0, 1], Adam lr 1e-3, 500 steps, 16 inputs per task and step, loss the mean entropy summed over tasks (one
    backward per task, as FusionBench does). `task_vectors: ties` is AdaMerging++ (trimmed per tensor here; the
    paper's code ranks over the whole task vector). Each model needs `data`: JSONL with a `text` field or a
    safetensors file of model inputs. The final merge is exact float32 from the checkpoints.
    """

    name = "adamerging"
    Params = AdaMergingParams

    def objective(self, params: AdaMergingParams, run: Adaptation) -> Entropy:
        from workers.engine.adaptive.objectives import Entropy

        return Entropy()
