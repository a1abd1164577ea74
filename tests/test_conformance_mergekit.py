"""Conformance with mergekit: the same merges through mergekit and through MergeForge give the same tensors.

A tiny LlamaForCausalLM family (base + fine-tunes = base + noise, float32, identical tensor names) is merged by
both engines. mergekit runs out of process through the `mergekit-yaml` command's entry point; every config runs
in one interpreter, because importing mergekit alone takes several seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from workers.engine.merge import run_merge
from workers.engine.spec import MergeSpec

pytest.importorskip("mergekit")

WEIGHTS = [1.0, 0.5, 0.7]

# case id -> (mergekit config, MergeForge spec). mergekit's ties always elects the sign by sum.
# Placeholders BASE / T0 / T1 / T2 are replaced by absolute paths.
CASES: dict[str, tuple[dict, dict]] = {
    "linear_normalize": (
        {"merge_method": "linear",
         "models": [{"model": "T0", "parameters": {"weight": 1.0}},
                    {"model": "T1", "parameters": {"weight": 0.5}},
                    {"model": "T2", "parameters": {"weight": 0.25}}],
         "parameters": {"normalize": True}},
        {"method": "linear", "weights": [1.0, 0.5, 0.25], "parameters": {"normalize": True}},
    ),
    "linear_no_normalize": (
        {"merge_method": "linear",
         "models": [{"model": "T0", "parameters": {"weight": 0.6}},
                    {"model": "T1", "parameters": {"weight": 0.3}},
                    {"model": "T2", "parameters": {"weight": 0.4}}],
         "parameters": {"normalize": False}},
        {"method": "linear", "weights": [0.6, 0.3, 0.4], "parameters": {"normalize": False}},
    ),
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "base_model": "BASE",
         "models": [{"model": "T0", "parameters": {"weight": 1.0}},
                    {"model": "T1", "parameters": {"weight": 0.5}},
                    {"model": "T2", "parameters": {"weight": 0.3}}],
         "parameters": {"lambda": 0.7}},
        {"method": "task_arithmetic", "weights": [1.0, 0.5, 0.3], "parameters": {"lambda": 0.7}},
    ),
    "ties_sum": (
        {"merge_method": "ties", "base_model": "BASE",
         "models": [{"model": f"T{k}", "parameters": {"weight": w, "density": 0.5}} for k, w in enumerate(WEIGHTS)],
         "parameters": {"lambda": 0.8}},
        {"method": "ties", "weights": WEIGHTS,
         "parameters": {"density": 0.5, "lambda": 0.8, "consensus": "sum", "merge": "mean", "scope": "tensor"}},
    ),
    "ties_sparse": (
        {"merge_method": "ties", "base_model": "BASE",
         "models": [{"model": f"T{k}", "parameters": {"weight": 1.0, "density": 0.2}} for k in range(3)],
         "parameters": {"lambda": 1.0}},
        {"method": "ties", "weights": [1.0, 1.0, 1.0],
         "parameters": {"density": 0.2, "lambda": 1.0, "consensus": "sum", "merge": "mean", "scope": "tensor"}},
    ),
    "slerp": (
        {"merge_method": "slerp", "base_model": "BASE",
         "models": [{"model": "BASE"}, {"model": "T0"}],
         "parameters": {"t": 0.3}},
        {"method": "slerp", "weights": [1.0], "parameters": {"t": 0.3}},
    ),
    "ties_bf16": (
        {"merge_method": "ties", "base_model": "BASE",
         "models": [{"model": f"T{k}", "parameters": {"weight": w, "density": 0.5}} for k, w in enumerate(WEIGHTS)],
         "parameters": {"lambda": 0.8}, "out_dtype": "bfloat16"},
        {"method": "ties", "weights": WEIGHTS, "dtype": "bfloat16",
         "parameters": {"density": 0.5, "lambda": 0.8, "consensus": "sum", "merge": "mean", "scope": "tensor"}},
    ),
    # The same family stored in bf16, as most published checkpoints are; both engines compute in float32.
    "task_arithmetic_bf16_inputs": (
        {"merge_method": "task_arithmetic", "base_model": "BF_BASE",
         "models": [{"model": f"BF_T{k}", "parameters": {"weight": w}} for k, w in enumerate(WEIGHTS)],
         "parameters": {"lambda": 0.7}},
        {"method": "task_arithmetic", "weights": WEIGHTS, "parameters": {"lambda": 0.7}, "family": "BF_"},
    ),
    "ties_bf16_inputs": (
        {"merge_method": "ties", "base_model": "BF_BASE",
         "models": [{"model": f"BF_T{k}", "parameters": {"weight": w, "density": 0.5}} for k, w in enumerate(WEIGHTS)],
         "parameters": {"lambda": 0.8}},
        {"method": "ties", "weights": WEIGHTS, "family": "BF_",
         "parameters": {"density": 0.5, "lambda": 0.8, "consensus": "sum", "merge": "mean", "scope": "tensor"}},
    ),
}
TIED_AT_THRESHOLD = {"ties_bf16_inputs"}


def _entries_tied_at_threshold(case: str, paths: dict[str, Path], name: str, density: float) -> torch.Tensor:
    """Where some task's |tau| equals its k-th largest magnitude in this tensor. Both tools keep exactly k entries,
    but which of the tied ones is a free choice (mergekit's torch.argsort is not stable; MergeForge keeps the
    first in storage order), so those entries are excluded from the comparison."""
    family = CASES[case][1].get("family", "")
    base = _weights(paths[f"{family}BASE"])[name].float()
    tied = torch.zeros_like(base, dtype=torch.bool)
    for k in range(len(CASES[case][1]["weights"])):
        magnitudes = (_weights(paths[f"{family}T{k}"])[name].float() - base).abs()
        keep = max(1, int(density * magnitudes.numel()))
        threshold = magnitudes.flatten().sort(descending=True).values[keep - 1]
        tied |= magnitudes == threshold
    return tied


def _build_llama_family(root: Path, n_tasks: int = 3, noise: float = 0.02) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    paths = {"BASE": root / "base"}
    base.save_pretrained(paths["BASE"], safe_serialization=True)
    for k in range(n_tasks):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(k + 11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise)
        paths[f"T{k}"] = root / f"task{k}"
        model.save_pretrained(paths[f"T{k}"], safe_serialization=True)
    for key in list(paths):
        folder = root / f"bf16-{paths[key].name}"
        folder.mkdir()
        tensors = load_file(str(paths[key] / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        config = json.loads((paths[key] / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
        paths[f"BF_{key}"] = folder
    return paths


def _fill(value, paths: dict[str, Path]):
    if isinstance(value, dict):
        return {k: _fill(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    if isinstance(value, str) and value in paths:
        return str(paths[value])
    return value


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    return _build_llama_family(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def mergekit_outputs(llama_family, tmp_path_factory) -> dict[str, Path]:
    """Every case merged by mergekit, in one subprocess calling the `mergekit-yaml` command's entry point."""
    work = tmp_path_factory.mktemp("mergekit")
    jobs = []
    for case, (config, _) in CASES.items():
        config = _fill({**config, "dtype": "float32"}, llama_family)
        path = work / f"{case}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs.append([str(path), str(work / case), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                     "--no-cuda"])
    script = textwrap.dedent(f"""
        from mergekit.scripts.run_yaml import main
        for args in {jobs!r}:
            main(args, standalone_mode=False)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"mergekit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {case: work / case for case in CASES}


def _mergeforge(case: str, paths: dict[str, Path], out: Path) -> Path:
    _, ours = CASES[case]
    weights, family = ours["weights"], ours.get("family", "")
    spec = {"method": ours["method"], "base_model": str(paths[f"{family}BASE"]),
            "models": [{"model": str(paths[f"{family}T{k}"]), "weight": w} for k, w in enumerate(weights)],
            "parameters": ours["parameters"], "dtype": ours.get("dtype", "float32")}
    run_merge(MergeSpec.model_validate(spec), out)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(case, llama_family, mergekit_outputs, tmp_path):
    theirs = _weights(mergekit_outputs[case])
    ours = _weights(_mergeforge(case, llama_family, tmp_path / "out"))
    base = {k: v.float() for k, v in _weights(llama_family[CASES[case][1].get("family", "") + "BASE"]).items()}
    assert set(ours) == set(theirs) == set(base)

    bf16 = CASES[case][1].get("dtype") == "bfloat16"
    expected_dtype = torch.bfloat16 if bf16 else torch.float32
    tolerance = {"rtol": 2**-7, "atol": 1e-6} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    moved = excluded = total = 0
    for name in sorted(ours):
        assert ours[name].dtype == theirs[name].dtype == expected_dtype, name
        assert ours[name].shape == theirs[name].shape, name
        compared = torch.ones_like(base[name], dtype=torch.bool)
        if case in TIED_AT_THRESHOLD:
            density = CASES[case][1]["parameters"]["density"]
            compared = ~_entries_tied_at_threshold(case, llama_family, name, density)
        excluded += int((~compared).sum())
        total += compared.numel()
        torch.testing.assert_close(ours[name].float()[compared], theirs[name].float()[compared], **tolerance,
                                   msg=lambda m, name=name: f"{case}: {name}: {m}")
        if (ours[name].float() - base[name]).abs().max() > 1e-3:
            moved += 1
    # The comparison is not vacuous: the merge changed the weights away from the base, and ties are few.
    assert moved >= len(ours) // 2
    assert excluded <= 0.02 * total


def test_cases_disagree_with_each_other(mergekit_outputs):
    """The reference outputs differ between parameter settings, so each comparison above checks its parameters."""
    name = "model.layers.0.mlp.up_proj.weight"
    outputs = {case: _weights(folder)[name].float() for case, folder in mergekit_outputs.items()}
    pairs = [("linear_normalize", "linear_no_normalize"), ("ties_sum", "ties_sparse"),
             ("ties_sum", "task_arithmetic")]
    for a, b in pairs:
        assert (outputs[a] - outputs[b]).abs().max() > 1e-4, (a, b)


def test_ties_trim_keeps_exactly_density_of_a_tensor(tmp_path):
    """One task model, weight 1, lambda 1: merged - base is the trimmed task vector, so its support is what the
    trim kept. Each of the 2 rows of tau is [4, 3, 2, 2, 2, 2, 1, 1] / 64; like mergekit, keep k = int(0.5 * 16) = 8
    entries: the 4 largest and 4 of the 8 tied at 2/64 (the first ones in storage order)."""
    from conftest import write_safetensors

    base = torch.zeros(2, 8)
    tau = torch.tensor([4.0, 3, 2, 2, 2, 2, 1, 1]) / 64  # exact in bf16 and float32
    write_safetensors(tmp_path / "base" / "model.safetensors", {"w": base})
    write_safetensors(tmp_path / "task" / "model.safetensors", {"w": base + tau})
    spec = MergeSpec.model_validate({"method": "ties", "base_model": str(tmp_path / "base"),
                                     "models": [{"model": str(tmp_path / "task")}],
                                     "parameters": {"density": 0.5, "lambda": 1.0, "scope": "tensor"}})
    run_merge(spec, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    kept = merged != 0
    assert int(kept.sum()) == 8, "density 0.5 of 16 entries keeps 8"
    assert bool(kept[:, :2].all()), "the two largest magnitudes are kept"
    # ties go by storage order: row 0 keeps all four of its 2/64 entries, row 1 none
    assert kept[0].tolist() == [True, True, True, True, True, True, False, False]
    assert kept[1].tolist() == [True, True, False, False, False, False, False, False]
