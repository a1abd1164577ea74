"""MergeSpec validation: rejections name the problem; overrides, sizes and relative paths resolve as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.engine.spec import LwPTVConfig, MergeSpec, ModelRef, load_spec, parse_size


def spec(**fields) -> MergeSpec:
    data = {"method": "ties", "base_model": "/ckpt/base", "models": [{"model": "/ckpt/a"}, {"model": "/ckpt/b"}]}
    data.update(fields)
    return MergeSpec.model_validate(data)


def test_minimal_spec_and_defaults():
    s = spec()
    assert s.method == "ties"
    assert [m.task_name() for m in s.models] == ["a", "b"]
    assert [m.weight for m in s.models] == [1.0, 1.0]
    assert s.parameters == {} and s.overrides == [] and s.lwptv is None
    assert s.task_specific == ["classifier.*", "score.*", "qa_outputs.*", "heads.*"]
    assert s.dtype is None and s.seed == 0
    assert s.shard_size == "5GB" and s.shard_bytes == 5 * 10**9
    assert s.method_params.density == 0.2


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValidationError) as info:
        spec(method="tiess")
    message = str(info.value)
    assert "unknown merge method 'tiess'" in message
    assert "available: adamerging, dare_linear, dare_ties, linear, slerp, task_arithmetic, ties, tinting" in message


@pytest.mark.parametrize(("method", "parameters", "field"), [
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"consensus": "vote"}, "consensus"),
    ("ties", {"lambda": 11.0}, "lambda"),
    ("ties", {"lambda": float("nan")}, "lambda"),
    ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
    ("dare_ties", {"drop_rate": -0.1}, "drop_rate"),
    ("task_arithmetic", {"lambda": -10.5}, "lambda"),
    ("slerp", {"t": -0.1}, "t"),
    ("slerp", {"t": 1.1}, "t"),
    ("slerp", {"dot_threshold": 0.0}, "dot_threshold"),
    ("linear", {"normalize": "maybe"}, "normalize"),
])
def test_out_of_range_parameters_are_rejected(method, parameters, field):
    models = [{"model": "/ckpt/a"}] if method == "slerp" else [{"model": "/ckpt/a"}, {"model": "/ckpt/b"}]
    with pytest.raises(ValidationError) as raised:
        spec(method=method, models=models, parameters=parameters)
    assert raised.value.errors()[0]["loc"] == ("parameters", field)


@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 1.0}),
    ("dare_linear", {"drop_rate": 0.0}),
    ("dare_linear", {"drop_rate": 0.99}),
    ("task_arithmetic", {"lambda": -10.0}),
    ("slerp", {"t": 0.0}),
    ("slerp", {"t": 1.0}),
])
def test_parameters_at_the_limits_are_accepted(method, parameters):
    models = [{"model": "/ckpt/a"}] if method == "slerp" else [{"model": "/ckpt/a"}, {"model": "/ckpt/b"}]
    s = spec(method=method, models=models, parameters=parameters)
    assert s.method_params.model_dump(by_alias=True) | parameters == s.method_params.model_dump(by_alias=True)


def test_unknown_parameter_key_is_rejected():
    with pytest.raises(ValidationError, match="densty"):
        spec(parameters={"densty": 0.5})
    with pytest.raises(ValidationError, match="drop_rate"):
        spec(method="task_arithmetic", parameters={"drop_rate": 0.5})


def test_unknown_spec_field_is_rejected():
    with pytest.raises(ValidationError, match="methd"):
        spec(methd="ties")


def test_slerp_takes_exactly_one_model():
    with pytest.raises(ValidationError, match="method 'slerp' takes exactly 1 task model"):
        spec(method="slerp")
    assert len(spec(method="slerp", models=[{"model": "/ckpt/a"}]).models) == 1


def test_at_least_one_model():
    with pytest.raises(ValidationError, match="models"):
        spec(models=[])


def test_duplicate_task_names_are_rejected():
    with pytest.raises(ValidationError, match="task names must be unique; repeated: task"):
        spec(models=[{"model": "/x/task.safetensors"}, {"model": "/y/task"}])
    with pytest.raises(ValidationError, match="repeated: same"):
        spec(models=[{"model": "/x/a", "name": "same"}, {"model": "/y/b", "name": "same"}])
    ok = spec(models=[{"model": "/x/task.safetensors", "name": "one"}, {"model": "/y/task", "name": "two"}])
    assert [m.task_name() for m in ok.models] == ["one", "two"]


def test_task_names():
    assert ModelRef(model="/models/my model.safetensors").task_name() == "my-model"
    assert ModelRef(model="runs/sst2/").task_name() == "sst2"
    assert ModelRef(model="/x/y", name="cola_v2").task_name() == "cola_v2"
    with pytest.raises(ValidationError, match="task name"):
        ModelRef(model="/x", name="bad name")
    with pytest.raises(ValidationError, match="task name"):
        ModelRef(model="/x", name="../up")
    with pytest.raises(ValidationError, match="weight"):
        ModelRef(model="/x", weight=-1.0)


def test_overrides_with_bad_params_are_rejected():
    with pytest.raises(ValidationError, match=r"overrides\[1\] \('\*\.bias'\): density"):
        spec(overrides=[{"match": "*.weight", "parameters": {"density": 0.5}},
                        {"match": "*.bias", "parameters": {"density": 2.0}}])
    with pytest.raises(ValidationError, match=r"overrides\[0\].*densityy"):
        spec(overrides=[{"match": "*", "parameters": {"densityy": 0.5}}])
    with pytest.raises(ValidationError, match="parameters"):
        spec(overrides=[{"match": "*", "parameters": {}}])


def test_override_combined_with_spec_parameters_is_validated():
    # slerp: t from the SPEC is fine, the override's dot_threshold is not
    with pytest.raises(ValidationError, match="dot_threshold"):
        spec(method="slerp", models=[{"model": "/a"}], parameters={"t": 0.3},
             overrides=[{"match": "lm_head.*", "parameters": {"dot_threshold": 1.5}}])


def test_params_for_applies_matching_overrides_in_order():
    s = spec(parameters={"density": 0.3, "lambda": 0.8}, overrides=[
        {"match": "encoder.*", "parameters": {"density": 0.5}},
        {"match": "*.bias", "parameters": {"density": 0.9, "lambda": 0.5}},
        {"match": "encoder.layer.0.*", "parameters": {"density": 0.7}},
    ])
    every = s.params_for("encoder.layer.0.attention.bias")  # all three match: the last density wins
    assert (every.density, every.lambda_) == (0.7, 0.5)
    two = s.params_for("encoder.layer.1.attention.bias")    # first and second
    assert (two.density, two.lambda_) == (0.9, 0.5)
    one = s.params_for("encoder.layer.1.attention.weight")  # first only
    assert (one.density, one.lambda_) == (0.5, 0.8)
    none = s.params_for("embeddings.word_embeddings.weight")
    assert (none.density, none.lambda_) == (0.3, 0.8)
    assert none == s.method_params
    # matching is case-sensitive and anchored at both ends
    assert s.params_for("Encoder.layer.0.weight").density == 0.3
    assert s.params_for("bert.encoder.layer.0.weight").density == 0.3
    # other parameters keep their defaults
    assert every.consensus == "sum" and every.merge == "mean" and every.scope == "tensor"


def test_is_task_specific():
    s = spec()
    assert s.is_task_specific("classifier.weight")
    assert s.is_task_specific("score.bias")
    assert not s.is_task_specific("bert.classifier.weight")
    assert not s.is_task_specific("encoder.layer.0.output.dense.weight")
    custom = spec(task_specific=["*.head.*"])
    assert custom.is_task_specific("model.head.weight") and not custom.is_task_specific("classifier.weight")


# --------------------------------------------------------------------------------------------------- LwPTV

def test_lwptv_relative_norm_needs_eta():
    with pytest.raises(ValidationError, match=r"lwptv\.eta is required with score 'relative_norm'"):
        spec(lwptv={"score": "relative_norm"})
    with pytest.raises(ValidationError, match="eta is required"):
        spec(lwptv={"score": "relative_norm", "eta": None})
    s = spec(lwptv={"score": "relative_norm", "eta": 0.01})
    assert s.lwptv.eta == 0.01


def test_lwptv_defaults_and_limits():
    s = spec(lwptv={})
    assert (s.lwptv.score, s.lwptv.q, s.lwptv.eta, s.lwptv.granularity) == ("saliency", 0.1, 0.5, "tensor")
    assert LwPTVConfig().eta == 0.5
    for bad in ({"q": 0.0}, {"q": 1.5}, {"eta": -0.1}, {"granularity": "row"}, {"score": "fisher"},
                {"block_pattern": "(unclosed"}, {"block_pattern": r"^encoder\.layer\.\d+\."}):
        with pytest.raises(ValidationError):
            spec(lwptv=bad)
    with pytest.raises(ValidationError, match="capturing group"):
        LwPTVConfig(block_pattern=r"^encoder\.")
    with pytest.raises(ValidationError, match="not a valid regex"):
        LwPTVConfig(block_pattern="(")


# ---------------------------------------------------------------------------------------------- shard size

@pytest.mark.parametrize(("value", "expected"), [
    ("500MB", 500_000_000),
    ("2GiB", 2 * 1024**3),
    ("2gib", 2 * 1024**3),
    ("1.5 KiB", 1536),
    ("1KiB", 1024),
    ("5GB", 5_000_000_000),
    ("3MiB", 3 * 1024**2),
    ("1TB", 10**12),
    ("4096", 4096),
    (1024, 1024),
    (10**9, 10**9),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [1000, "1000", "1KB", "1000B", 0, "lots", "5 GBs", "-5MB", "", "MB"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_shard_size_in_spec():
    assert spec(shard_size="500MB").shard_bytes == 500_000_000
    assert spec(shard_size="2GiB").shard_bytes == 2 * 1024**3
    assert spec(shard_size=4096).shard_bytes == 4096
    with pytest.raises(ValidationError, match="below 1 KiB"):
        spec(shard_size=1000)
    with pytest.raises(ValidationError, match="cannot read"):
        spec(shard_size="big")


def test_other_fields():
    with pytest.raises(ValidationError, match="dtype"):
        spec(dtype="float64")
    with pytest.raises(ValidationError, match="seed"):
        spec(seed=-1)
    assert spec(dtype="bfloat16").dtype == "bfloat16"
    s = spec()
    with pytest.raises(ValidationError):
        s.seed = 3  # frozen


# ------------------------------------------------------------------------------------------------ load_spec

def test_load_spec_yaml_resolves_paths_against_the_spec_folder(tmp_path, monkeypatch):
    folder = tmp_path / "jobs" / "one"
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(
        "method: task_arithmetic\n"
        "base_model: ../models/base\n"
        "models:\n"
        "  - model: tasks/sst2.safetensors\n"
        "    weight: 0.5\n"
        "  - model: /abs/path/cola\n"
        "  - model: hf://org/model\n"
        "parameters:\n"
        "  lambda: 0.4\n"
        "shard_size: 2GiB\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the SPEC, not to the working directory
    s = load_spec(folder / "spec.yaml")
    assert s.base_model == str((tmp_path / "jobs" / "models" / "base").resolve())
    assert s.models[0].model == str((folder / "tasks" / "sst2.safetensors").resolve())
    assert s.models[0].weight == 0.5
    assert s.models[1].model == "/abs/path/cola"
    assert s.models[2].model == "hf://org/model"
    assert s.method_params.lambda_ == 0.4
    assert s.shard_bytes == 2 * 1024**3
    assert [m.task_name() for m in s.models] == ["sst2", "cola", "model"]


def test_load_spec_json(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({
        "method": "slerp", "base_model": "base", "models": [{"model": "./ft", "name": "chat"}],
        "parameters": {"t": 0.25},
    }))
    s = load_spec(str(path))
    assert s.base_model == str((tmp_path / "base").resolve())
    assert s.models[0].model == str((tmp_path / "ft").resolve())
    assert Path(s.models[0].model).is_absolute()
    assert s.method_params.t == 0.25


def test_load_spec_rejects_bad_files(tmp_path):
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- method: ties\n")
    with pytest.raises(ValueError, match="a SPEC is a mapping"):
        load_spec(not_mapping)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nbase_model: b\nmodels:\n  - model: a\nparameters:\n  density: 1.5\n")
    with pytest.raises(ValidationError, match="density"):
        load_spec(bad)
