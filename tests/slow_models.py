"""A synthetic checkpoint family large enough that a multi-pass merge of it runs for several seconds: plain
safetensors folders (model.safetensors + config.json), a base and task models that differ from it by small noise.
Used by the service tests that must act on a job while the worker is inside the merge."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# 96 tensors of 512x512 float32: 96 MiB per model, 4 models. slow_spec() makes the engine stream every shared tensor
# 18 times (LwPTV saliency: 3 passes; global TIES thresholds: 2 passes for each of 7 distinct densities; the merge:
# 1 pass): about 7 s on two idle cores, much more when they are shared.
N_TENSORS = 96
SHAPE = (512, 512)
N_TASKS = 3
NOISE_POOL = 17
N_DENSITIES = 6  # overrides with distinct global densities: two threshold passes each


def build_slow_family(root: Path, n_tensors: int = N_TENSORS, n_tasks: int = N_TASKS, seed: int = 0) -> dict[str, Path]:
    """Write base/ and task{k}/ under root; returns name -> folder."""
    generator = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.weight": torch.randn(SHAPE, generator=generator) * 0.02 for i in range(n_tensors)}
    folders = {"base": _write(root / "base", base)}
    # Task vectors drawn from a small pool of noise tensors at varying scales: cheap to build, and layers differ
    # enough in magnitude that LwPTV has something to rank.
    pool = [torch.randn(SHAPE, generator=generator) for _ in range(NOISE_POOL)]
    for k in range(n_tasks):
        task = {name: t + pool[(i * (k + 1)) % NOISE_POOL] * (0.001 * (1 + (i + k) % 4))
                for i, (name, t) in enumerate(base.items())}
        folders[f"task{k}"] = _write(root / f"task{k}", task)
    return folders


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "hidden_size": SHAPE[1],
                                                    "num_layers": len(tensors), "torch_dtype": "float32"}))
    return folder


def slow_spec(uris: dict[str, str], n_tasks: int = N_TASKS) -> dict:
    """TIES with global thresholds (7 distinct densities, by the last digit of a layer's index) and LwPTV saliency
    scoring; `task_specific: []` so every tensor is merged."""
    return {"method": "ties", "base_model": uris["base"],
            "models": [{"model": uris[f"task{k}"], "name": f"task{k}"} for k in range(n_tasks)],
            "parameters": {"density": 0.2, "scope": "global"}, "lwptv": {"q": 0.1}, "task_specific": [],
            "overrides": [{"match": f"layers.*{d}.weight", "parameters": {"density": 0.12 + d / 20}}
                          for d in range(N_DENSITIES)]}
