"""LwPTV: layer-wise pruning of task vectors (arXiv 2506.09093), in the reading this project implements.

No reference code is public, so the definition is ours, from the paper's description:
- A "layer" is one parameter tensor, or (granularity `block`) the tensors whose names share a block prefix such as
  `encoder.layer.3.` (group 1 of `block_pattern`); tensors outside any block are layers of their own.
- `saliency` of layer l for task k = (fraction of the entries of tau_k^l that are among tau_k's global top-q by
  magnitude) / q. 1.0 means "as dense in salient entries as the task vector on average"; a layer far below 1
  holds little of what the fine-tune changed and is redundant for that task.
- `relative_norm` of layer l for task k = ||tau_k^l|| / ||theta_0^l||.
- Layers scoring below eta are pruned for that task: tau_k^l is zeroed, so the method sees theta_k^l = theta_0^l.
  Where every task is pruned, the merged layer is exactly the pretrained one.
The global top-q threshold is exact (two streaming passes, see `selection.py`); a third pass counts per layer.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workers.engine.selection import global_thresholds
from workers.engine.spec import LwPTVConfig
from workers.engine.tensors import Chunk, TensorSource


def layer_of(tensor_name: str, config: LwPTVConfig) -> str:
    if config.granularity == "tensor":
        return tensor_name
    match = re.match(config.block_pattern, tensor_name)
    return match.group(1) if match else tensor_name


@dataclass(frozen=True)
class LwPTVResult:
    pruned: dict[str, list[bool]]  # tensor name -> per task, pruned?
    report: dict[str, Any]          # the lwptv.json artifact


def compute(config: LwPTVConfig, sources: Sequence[TensorSource], task_names: list[str],
            tick: Callable[[int], None]) -> LwPTVResult:
    n_tasks = len(task_names)
    layers: dict[str, list[TensorSource]] = defaultdict(list)
    for source in sources:
        layers[layer_of(source.name, config)].append(source)
    scores: dict[str, list[float]] = {}
    if config.score == "saliency":
        thresholds = global_thresholds(sources, [config.q] * n_tasks, tick)
        for layer, members in layers.items():
            salient = [0] * n_tasks
            for source in members:
                for numel, counts in source.map_chunks(lambda chunk: _count_salient(chunk, thresholds)):
                    salient = [a + b for a, b in zip(salient, counts, strict=True)]
                    tick(numel)
            numel = sum(s.numel for s in members)
            scores[layer] = [(c / numel) / config.q if numel else 0.0 for c in salient]
    else:
        for layer, members in layers.items():
            sq_tau, sq_base = [0.0] * n_tasks, 0.0
            for source in members:
                for numel, base_sq, tau_sq in source.map_chunks(_squares):
                    sq_base += base_sq
                    sq_tau = [a + b for a, b in zip(sq_tau, tau_sq, strict=True)]
                    tick(numel)
            scores[layer] = [math.sqrt(s) / math.sqrt(sq_base) if sq_base > 0 else math.inf for s in sq_tau]
    pruned_layer = {layer: [s < config.eta for s in row] for layer, row in scores.items()}
    pruned = {s.name: pruned_layer[layer_of(s.name, config)] for s in sources}
    report = {
        "paper": "arXiv 2506.09093",
        "config": config.model_dump(),
        "tasks": {
            task: {
                "kept": sum(not pruned_layer[layer][k] for layer in layers),
                "pruned": sum(pruned_layer[layer][k] for layer in layers),
                "layers": {layer: {"score": _finite(scores[layer][k]), "kept": not pruned_layer[layer][k],
                                   "tensors": [s.name for s in layers[layer]]} for layer in layers},
            }
            for k, task in enumerate(task_names)
        },
    }
    return LwPTVResult(pruned, report)


def _count_salient(chunk: Chunk, thresholds: list[float]) -> tuple[int, list[int]]:
    """Entries at or above the task's global threshold; an entry the fine-tune left unchanged is never salient,
    even when fewer than q of the task vector changed and the threshold is 0."""
    counts = []
    for tau, t in zip(chunk.task_vectors(), thresholds, strict=True):
        magnitudes = tau.abs_()
        counts.append(int((magnitudes >= t if t > 0 else magnitudes > 0).count_nonzero()))
    return chunk.base.numel(), counts


def _squares(chunk: Chunk) -> tuple[int, float, list[float]]:
    return (chunk.base.numel(), float(chunk.base.double().square().sum()),
            [float(tau.double().square().sum()) for tau in chunk.task_vectors()])


def _finite(x: float) -> float | None:
    """JSON has no infinity: a layer of a zero base tensor has no relative norm."""
    return round(x, 6) if math.isfinite(x) else None
