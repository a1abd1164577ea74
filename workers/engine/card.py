"""The model card (README.md with Hugging Face YAML front matter) written beside the merged weights."""

from __future__ import annotations

from typing import Any

import yaml

from workers.engine import __version__
from workers.engine.spec import MergeSpec

_ADAPTED_FILES = {
    "coefficients.json": "the task x layer coefficient table (null where LwPTV pruned a layer)",
    "coefficients.png": "that table as a heatmap",
    "loss_curve.json": "the loss per step, summed and per task",
    "loss_curve.png": "that curve as a plot",
}


def model_card(spec: MergeSpec, heads: dict[str, list[str]], lwptv: dict[str, Any] | None, dtype: str,
               adapted_files: list[str] | None = None) -> str:
    front = {"base_model": spec.base_model, "tags": ["merge", "mergeforge", spec.method],
             "library_name": "transformers"}
    method = spec.method_cls
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Merged model ({spec.method})", "",
        f"Merged with [MergeForge](https://github.com/mergeforge) {__version__} from {len(spec.models)} task "
        f"model(s) of `{spec.base_model}`, written in {dtype}.", "",
        "## Method", "", f"`{spec.method}`: {method.summary()}", "",
        "Parameters (defaults filled in):", "", "```yaml",
        yaml.safe_dump(spec.method_params.model_dump(by_alias=True), sort_keys=True).strip(), "```", "",
    ]
    if spec.overrides:
        lines += ["Per-tensor overrides (later ones win):", ""]
        lines += [f"- `{o.match}`: {o.parameters}" for o in spec.overrides]
        lines.append("")
    lines += ["## Inputs", "", "| task | checkpoint | weight | data |", "| --- | --- | --- | --- |"]
    lines += [f"| {m.task_name()} | `{m.model}` | {m.weight} | {f'`{m.data}`' if m.data else '-'} |"
              for m in spec.models]
    lines.append("")
    if adapted_files:
        lines += ["## Learned coefficients", "",
                  "The merging coefficients were learned on each task's unlabeled data (see Method). Files:", ""]
        lines += [f"- `{name}`: {_ADAPTED_FILES.get(name, '')}" for name in adapted_files]
        lines.append("")
    if lwptv:
        lines += ["## LwPTV layer pruning (arXiv 2506.09093)", "",
                  f"Score `{spec.lwptv.score}`, q {spec.lwptv.q}, eta {spec.lwptv.eta}, granularity "
                  f"`{spec.lwptv.granularity}`. Per-layer scores are in `lwptv.json`.", "",
                  "| task | layers kept | layers pruned |", "| --- | --- | --- |"]
        lines += [f"| {t} | {r['kept']} | {r['pruned']} |" for t, r in lwptv["tasks"].items()]
        lines.append("")
    if any(heads.values()):
        lines += ["## Task-specific tensors", "",
                  "Never merged: each task's own tensors (its head) are in `heads/<task>.safetensors` under the "
                  "task model's names. Load the merged body, then the task's head, to run that task.", ""]
        lines += [f"- {task}: {', '.join(f'`{n}`' for n in names)}" for task, names in heads.items() if names]
        lines.append("")
    lines += ["## Reproduce", "", "`merge_manifest.json` holds the SPEC and the sha256 of every input and output "
              "file. Run `mergeforge merge spec.yaml OUT` with this SPEC:", "", "```yaml",
              yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False).strip(),
              "```", ""]
    return "\n".join(lines)
