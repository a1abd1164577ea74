"""What an adaptation learned, as artifacts: the coefficient table (JSON and a heatmap) and the loss curve (JSON
and a plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.engine.adaptive.loop import Adapted

COEFFICIENTS = "coefficients.json"
COEFFICIENTS_PNG = "coefficients.png"
CURVE = "loss_curve.json"
CURVE_PNG = "loss_curve.png"


def write_report(adapted: Adapted, tasks: list[str], params: dict[str, Any], folder: Path) -> list[Path]:
    coefficients = {
        "granularity": params["granularity"],
        "task_vectors": params["task_vectors"],
        "clamped": params["clamp"],
        "steps": len(adapted.curve) and adapted.curve[-1]["step"],
        "resumed_from_step": adapted.resumed_from,
        "tasks": tasks,
        "layers": adapted.groups,
        "tensors": {group: [n for n, g in adapted.group_of.items() if adapted.groups[g] == group]
                    for group in adapted.groups},
        "coefficients": {task: dict(zip(adapted.groups, [None if v is None else round(v, 6) for v in row],
                                        strict=True))
                         for task, row in zip(tasks, adapted.coefficients, strict=True)},
        "note": "theta_l = theta_0,l + sum_k coefficients[k][layer(l)] * tau_k,l; null: LwPTV pruned the layer "
                "for that task (no coefficient, pretrained weights).",
    }
    curve = {"metric": adapted.metric, "points": adapted.curve}
    (folder / COEFFICIENTS).write_text(json.dumps(coefficients, indent=2) + "\n")
    (folder / CURVE).write_text(json.dumps(curve, indent=2) + "\n")
    _heatmap(adapted, tasks, folder / COEFFICIENTS_PNG)
    _curve_plot(adapted, tasks, folder / CURVE_PNG)
    return [folder / name for name in (COEFFICIENTS, COEFFICIENTS_PNG, CURVE, CURVE_PNG)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _heatmap(adapted: Adapted, tasks: list[str], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    table = np.array([[np.nan if v is None else v for v in row] for row in adapted.coefficients]).T
    rows = len(adapted.groups)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(tasks), min(2.0 + 0.16 * rows, 60)))
    image = ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    if rows <= 400:
        ax.set_yticks(range(rows), adapted.groups, fontsize=max(3, min(8, 600 // max(rows, 1))))
    ax.set_title("merging coefficients (blank: pruned)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_plot(adapted: Adapted, tasks: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p["step"] for p in adapted.curve]
    ax.plot(steps, [p["loss"] for p in adapted.curve], label="sum", color="black", linewidth=2)
    for task in tasks:
        ax.plot(steps, [p["tasks"][task] for p in adapted.curve], label=task, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(adapted.metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
