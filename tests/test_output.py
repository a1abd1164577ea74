"""End to end: what a merge writes (weights, config, tokenizer, heads, shards, manifest, card) on a BERT family."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import workers.engine
from workers.engine.merge import Progress, run_merge
from workers.engine.spec import MergeSpec

MERGEFORGE = [shutil.which("mergeforge")] if shutil.which("mergeforge") else [sys.executable, "-m",
                                                                            "workers.engine.cli"]
METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "adamerging", "tinting"}
HEAD = ("classifier.weight", "classifier.bias")
TIES_PARAMS = {"density": 0.5, "lambda": 0.9, "consensus": "sum", "merge": "mean", "scope": "tensor"}


def _spec_dict(family, method: str, parameters: dict, **extra) -> dict:
    return {"method": method, "base_model": str(family.base),
            "models": [{"model": str(t)} for t in family.tasks], "parameters": parameters, **extra}


def _merge(family, out: Path, method: str, parameters: dict, **extra) -> Path:
    run_merge(MergeSpec.model_validate(_spec_dict(family, method, parameters, **extra)), out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial"))


@pytest.fixture(scope="module")
def ties_spec(bert_family) -> dict:
    return _spec_dict(bert_family, "ties", TIES_PARAMS, dtype="bfloat16", seed=3)


@pytest.fixture(scope="module")
def cli_ties(ties_spec, tmp_path_factory) -> Path:
    """A TIES merge in bf16 through `mergeforge merge spec.yml out -q` in a subprocess. The SPEC names its
    checkpoints relative to its own folder, and is run from another folder."""
    work = tmp_path_factory.mktemp("cli")
    (work / "specs").mkdir()
    relative = {**ties_spec, "base_model": os.path.relpath(ties_spec["base_model"], work / "specs"),
                "models": [{"model": os.path.relpath(m["model"], work / "specs")} for m in ties_spec["models"]]}
    assert not Path(relative["base_model"]).is_absolute()
    (work / "specs" / "spec.yml").write_text(yaml.safe_dump(relative, sort_keys=False))
    out = work / "out"
    proc = subprocess.run([*MERGEFORGE, "merge", "specs/spec.yml", "out", "-q"], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"merged 3 model(s) with ties into {out.name}" in proc.stdout
    assert _leftovers(out) == []
    return out


@pytest.fixture(scope="module")
def base_tensors(bert_family) -> dict[str, torch.Tensor]:
    return load_file(str(bert_family.base / "model.safetensors"))


@pytest.fixture(scope="module")
def task_tensors(bert_family) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(t / "model.safetensors")) for t in bert_family.tasks]


@pytest.fixture(scope="module")
def task_arithmetic_out(bert_family, tmp_path_factory) -> Path:
    return _merge(bert_family, tmp_path_factory.mktemp("ta") / "out", "task_arithmetic", {"lambda": 0.5})


# --- the CLI TIES merge -----------------------------------------------------------------------------------------


def test_output_loads_with_transformers(cli_ties, base_tensors):
    from transformers import BertModel

    model, info = BertModel.from_pretrained(cli_ties, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = load_file(str(cli_ties / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name].float(), tensor.float()), name
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert hidden.shape == (1, 4, 32) and bool(torch.isfinite(hidden).all())


def test_cli_output_equals_in_process_merge(cli_ties, ties_spec, tmp_path):
    """Same SPEC in a subprocess and in process: the same bytes (determinism across processes too)."""
    result = run_merge(MergeSpec.model_validate(ties_spec), tmp_path / "again")
    ours = load_file(str(result.out_dir / "model.safetensors"))
    cli = load_file(str(cli_ties / "model.safetensors"))
    assert set(ours) == set(cli)
    for name in cli:
        assert torch.equal(ours[name], cli[name]), name
    for rel in ["model.safetensors", *(f"heads/task{k}.safetensors" for k in range(3))]:
        assert (tmp_path / "again" / rel).read_bytes() == (cli_ties / rel).read_bytes(), rel


def test_ties_tensor_equals_hand_computation(cli_ties, base_tensors, task_tensors):
    name = "encoder.layer.1.intermediate.dense.weight"
    base = base_tensors[name]
    trimmed = []
    for task in task_tensors:
        tau = task[f"bert.{name}"] - base
        k = int(TIES_PARAMS["density"] * tau.numel())
        threshold = tau.abs().flatten().topk(k).values[-1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    expected = base + TIES_PARAMS["lambda"] * merged
    got = load_file(str(cli_ties / "model.safetensors"))[name]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
    assert (got.float() - base).abs().max() > 1e-3


def test_bfloat16_output_and_config_dtype(cli_ties, bert_family):
    config = json.loads((cli_ties / "config.json").read_text())
    base_config = json.loads((bert_family.base / "config.json").read_text())
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in base_config] or ["dtype"]
    for key in dtype_keys:
        assert base_config.get(key) != "bfloat16"
        assert config[key] == "bfloat16", key
    assert {k: v for k, v in config.items() if k not in dtype_keys} == \
           {k: v for k, v in base_config.items() if k not in dtype_keys}
    with safe_open(str(cli_ties / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert dtypes == {"BF16"}
    assert json.loads((cli_ties / "merge_manifest.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_files_copied(cli_ties, bert_family):
    for name in ("tokenizer_config.json", "vocab.txt"):
        assert (cli_ties / name).read_bytes() == (bert_family.base / name).read_bytes(), name


def test_heads_hold_each_tasks_own_classifier(cli_ties, task_tensors, base_tensors):
    body = load_file(str(cli_ties / "model.safetensors"))
    assert set(body) == set(base_tensors)
    assert not any(n.startswith("classifier") or n.startswith("bert.") for n in body)
    assert sorted(p.name for p in (cli_ties / "heads").iterdir()) == [f"task{k}.safetensors" for k in range(3)]
    for k, task in enumerate(task_tensors):
        head = load_file(str(cli_ties / "heads" / f"task{k}.safetensors"))
        assert set(head) == set(HEAD)
        assert head["classifier.weight"].shape == (2 + k, 32)
        for name in HEAD:
            assert head[name].dtype == task[name].dtype
            assert torch.equal(head[name], task[name]), (k, name)


def test_manifest_lists_inputs_and_outputs_with_matching_sha256(cli_ties, bert_family, ties_spec):
    manifest = json.loads((cli_ties / "merge_manifest.json").read_text())

    on_disk = {p.relative_to(cli_ties).as_posix() for p in cli_ties.rglob("*") if p.is_file()}
    listed = {o["path"] for o in manifest["outputs"]}
    assert listed == on_disk - {"merge_manifest.json"}
    assert {"model.safetensors", "config.json", "README.md", "heads/task0.safetensors"} <= listed
    for output in manifest["outputs"]:
        path = cli_ties / output["path"]
        assert output["sha256"] == _sha256(path), output["path"]
        assert output["size"] == path.stat().st_size

    inputs = manifest["inputs"]
    assert [(i["role"], i["name"]) for i in inputs] == [("base", "base"), ("model", "task0"), ("model", "task1"),
                                                        ("model", "task2")]
    folders = [bert_family.base, *bert_family.tasks]
    for entry, folder in zip(inputs, folders, strict=True):
        assert Path(entry["model"]) == folder
        assert {f["path"] for f in entry["files"]} == {"model.safetensors", "config.json"}
        for f in entry["files"]:
            assert f["sha256"] == _sha256(folder / f["path"]), (folder, f["path"])
            assert f["size"] == (folder / f["path"]).stat().st_size

    spec = manifest["spec"]
    assert spec["method"] == "ties" and spec["dtype"] == "bfloat16" and spec["seed"] == 3
    assert spec["base_model"] == ties_spec["base_model"]
    assert [m["model"] for m in spec["models"]] == [m["model"] for m in ties_spec["models"]]
    assert spec["parameters"] == TIES_PARAMS
    assert MergeSpec.model_validate(spec) == MergeSpec.model_validate(ties_spec)

    assert manifest["engine"]["name"] == "mergeforge"
    assert manifest["engine"]["version"] == workers.engine.__version__
    assert manifest["engine"]["torch"] == torch.__version__
    timings = manifest["timings"]
    assert {"validate_s", "merge_s", "total_s"} <= set(timings)
    assert all(isinstance(v, int | float) and v >= 0 for v in timings.values())
    assert timings["total_s"] >= timings["merge_s"]
    datetime.fromisoformat(manifest["created_at"])
    assert {t: sorted(v) for t, v in manifest["task_specific"].items()} == {f"task{k}": sorted(HEAD)
                                                                            for k in range(3)}


def test_readme_front_matter(cli_ties, bert_family):
    text = (cli_ties / "README.md").read_text()
    assert text.startswith("---\n")
    front_text, _, body = text[4:].partition("\n---\n")
    front = yaml.safe_load(front_text)
    assert front["base_model"] == str(bert_family.base)
    assert {"merge", "mergeforge"} <= set(front["tags"])
    assert "ties" in body


# --- in-process merges ------------------------------------------------------------------------------------------


def test_prefix_aligned_body_equals_hand_computed_task_arithmetic(task_arithmetic_out, base_tensors, task_tensors):
    merged = load_file(str(task_arithmetic_out / "model.safetensors"))
    assert set(merged) == set(base_tensors)
    for name, base in base_tensors.items():
        expected = base + 0.5 * sum(task[f"bert.{name}"] - base for task in task_tensors)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)
        assert (merged[name] - base).abs().max() > 1e-3, f"{name} was not merged"


def test_per_tensor_override(bert_family, tmp_path, task_arithmetic_out, base_tensors):
    out = _merge(bert_family, tmp_path / "out", "task_arithmetic", {"lambda": 0.5},
                 overrides=[{"match": "*.attention.*", "parameters": {"lambda": 0.0}}])
    merged = load_file(str(out / "model.safetensors"))
    plain = load_file(str(task_arithmetic_out / "model.safetensors"))
    attention = [n for n in merged if ".attention." in n]
    others = [n for n in merged if ".attention." not in n]
    assert len(attention) == 20 and others
    for name in attention:
        assert torch.equal(merged[name], base_tensors[name]), name
        assert not torch.equal(plain[name], base_tensors[name]), name
    for name in others:
        assert torch.equal(merged[name], plain[name]), name
        assert not torch.equal(merged[name], base_tensors[name]), name


def test_sharded_output(bert_family, tmp_path, task_arithmetic_out):
    from transformers import BertModel

    out = _merge(bert_family, tmp_path / "out", "task_arithmetic", {"lambda": 0.5}, shard_size="20KB")
    shards = sorted(out.glob("model*.safetensors"))
    match = [re.fullmatch(r"model-(\d{5})-of-(\d{5})\.safetensors", p.name) for p in shards]
    assert all(match), [p.name for p in shards]
    n = int(match[0].group(2))
    assert n >= 3 and len(shards) == n
    assert [int(m.group(1)) for m in match] == list(range(1, n + 1))
    assert all(int(m.group(2)) == n for m in match)
    assert not (out / "model.safetensors").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    unsharded = load_file(str(task_arithmetic_out / "model.safetensors"))
    assert set(weight_map) == set(unsharded)
    total = 0
    for shard in shards:
        tensors = load_file(str(shard))
        assert {k for k, v in weight_map.items() if v == shard.name} == set(tensors), shard.name
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 20_000, (shard.name, data)
        total += data
        for name, tensor in tensors.items():
            assert torch.equal(tensor, unsharded[name]), name
    assert index["metadata"]["total_size"] == total

    manifest_paths = {o["path"] for o in json.loads((out / "merge_manifest.json").read_text())["outputs"]}
    assert {p.name for p in shards} | {"model.safetensors.index.json"} <= manifest_paths

    model, info = BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for name, tensor in unsharded.items():
        assert torch.equal(state[name], tensor), name


def test_dare_ties_is_deterministic_per_seed(bert_family, tmp_path):
    params = {"drop_rate": 0.5, "lambda": 1.0}
    a = _merge(bert_family, tmp_path / "a", "dare_ties", params, seed=7)
    b = _merge(bert_family, tmp_path / "b", "dare_ties", params, seed=7)
    c = _merge(bert_family, tmp_path / "c", "dare_ties", params, seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    ta, tc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    differing = [n for n in ta if not torch.equal(ta[n], tc[n])]
    assert len(differing) == len(ta), "a new seed should redraw every tensor's mask"
    for k in range(3):
        rel = f"heads/task{k}.safetensors"
        assert (a / rel).read_bytes() == (c / rel).read_bytes()


def test_ties_is_deterministic(bert_family, tmp_path):
    a = _merge(bert_family, tmp_path / "a", "ties", TIES_PARAMS)
    b = _merge(bert_family, tmp_path / "b", "ties", TIES_PARAMS)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


class _Cancelled(Exception):
    pass


@pytest.mark.parametrize("stage", ["validate", "merge", "heads", "finalize"])
def test_cancel_from_progress_leaves_nothing(bert_family, tmp_path, stage):
    out = tmp_path / "out"
    partial_files: list[Path] = []

    def progress(p: Progress) -> None:
        if p.stage == stage and (stage != "merge" or p.fraction > 0.5):
            partial_files.extend(f for d in _leftovers(out) for f in d.rglob("*") if f.is_file())
            raise _Cancelled(stage)

    spec = MergeSpec.model_validate(_spec_dict(bert_family, "ties", TIES_PARAMS))
    with pytest.raises(_Cancelled):
        run_merge(spec, out, progress)
    assert not out.exists()
    assert _leftovers(out) == []
    if stage in ("heads", "finalize"):
        assert partial_files, "the cancelled merge had written files, which must be gone"
    assert all(not f.exists() for f in partial_files)


def test_methods_json_lists_every_method_with_schemas():
    proc = subprocess.run([*MERGEFORGE, "methods", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    methods = {m["name"]: m for m in json.loads(proc.stdout)}
    assert set(methods) == METHODS
    for name, m in methods.items():
        schema = m["parameters"]
        assert schema["type"] == "object" and schema.get("additionalProperties") is False, name
        assert m["summary"], name
    assert set(methods["ties"]["parameters"]["properties"]) == {"density", "lambda", "consensus", "merge", "scope"}
    assert methods["ties"]["parameters"]["properties"]["density"]["maximum"] == 1.0
    assert set(methods["ties"]["parameters"]["properties"]["consensus"]["enum"]) == {"sum", "count"}
    assert "lambda" in methods["task_arithmetic"]["parameters"]["properties"]
    assert "t" in methods["slerp"]["parameters"]["properties"]
    assert methods["slerp"]["models"] == {"min": 1, "max": 1}
    assert "normalize" in methods["linear"]["parameters"]["properties"]
    assert {"drop_rate", "rescale", "lambda"} <= set(methods["dare_linear"]["parameters"]["properties"])
