"""Adaptive methods (AdaMerging, Model Tinting) through the engine's public entry point, on real experts of
synthetic tasks: what they learn, what they write, cancel and resume, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adaptive_family import AdaptiveFamily, build_adaptive_family
from safetensors.torch import load_file, save_file

from workers.engine.errors import EngineError
from workers.engine.merge import Progress, Resume, run_merge
from workers.engine.spec import MergeSpec

FAST = {"steps": 30, "lr": 0.05}
PROBE = "encoder.layer.0.attention.self.query.weight"


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> AdaptiveFamily:
    return build_adaptive_family(tmp_path_factory.mktemp("adaptive"))


def spec_for(family: AdaptiveFamily, method: str = "adamerging", data: list[Path] | None = None,
             **fields) -> MergeSpec:
    return MergeSpec.model_validate({
        "method": method, "base_model": str(family.base),
        "models": [{"model": str(t), "data": str(d)} for t, d in zip(family.tasks, data or family.data, strict=True)],
        **fields})


def body(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def task_vector(family: AdaptiveFamily, k: int, name: str) -> torch.Tensor:
    return load_file(str(family.tasks[k] / "model.safetensors"))[f"bert.{name}"] - base_tensor(family, name)


def base_tensor(family: AdaptiveFamily, name: str) -> torch.Tensor:
    return load_file(str(family.base / "model.safetensors"))[name]


def mean_entropy(family: AdaptiveFamily, out: Path) -> float:
    """The merged model's prediction entropy on the tasks' unlabeled inputs, through the written artifacts."""
    from transformers import BertForSequenceClassification

    total = 0.0
    for k, task in enumerate(family.tasks):
        model = BertForSequenceClassification.from_pretrained(task).eval()
        state = {f"bert.{n}": t for n, t in body(out).items()}
        state.update(load_file(str(out / "heads" / f"{task.name}.safetensors")))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("position_ids" in m for m in missing)
        ids = family.labelled[k][0]
        with torch.no_grad():
            log_p = model(input_ids=ids).logits.log_softmax(-1)
        total += float(-(log_p.exp() * log_p).sum(-1).mean())
    return total


def test_adamerging_lowers_entropy_with_coefficients_in_range(family, tmp_path):
    result = run_merge(spec_for(family, parameters=FAST), tmp_path / "ada")
    out = result.out_dir
    curve = json.loads((out / "loss_curve.json").read_text())
    losses = [p["loss"] for p in curve["points"]]
    assert curve["metric"] == "entropy" and len(losses) == 30
    assert sum(losses[-5:]) < sum(losses[:5])
    table = json.loads((out / "coefficients.json").read_text())
    assert table["granularity"] == "layer" and len(table["layers"]) == 39
    values = [v for row in table["coefficients"].values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 10
    # The written body is theta_0 + sum_k lambda_k tau_k with the reported coefficients, in float32.
    expected = base_tensor(family, PROBE) + sum(table["coefficients"][t.name][PROBE] * task_vector(family, k, PROBE)
                                                 for k, t in enumerate(family.tasks))
    torch.testing.assert_close(body(out)[PROBE], expected, atol=1e-6, rtol=1e-5)
    # Learning paid off: lower entropy than task arithmetic at the initial coefficient 0.3, measured independently.
    task_arithmetic = run_merge(MergeSpec.model_validate({
        "method": "task_arithmetic", "base_model": str(family.base), "parameters": {"lambda": 0.3},
        "models": [{"model": str(t)} for t in family.tasks]}), tmp_path / "ta")
    assert mean_entropy(family, out) < mean_entropy(family, task_arithmetic.out_dir)
    listed = {f["path"] for f in result.manifest["outputs"]}
    assert {"coefficients.json", "coefficients.png", "loss_curve.json", "loss_curve.png"} <= listed
    assert (out / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coefficients.json" in (out / "README.md").read_text()
    assert result.manifest["timings"]["adapt_s"] > 0


@pytest.mark.parametrize(("granularity", "groups"), [("task", 1), ("block", 2 + 7)])
def test_coarser_granularities(family, tmp_path, granularity, groups):
    out = run_merge(spec_for(family, parameters={**FAST, "steps": 3, "granularity": granularity}),
                    tmp_path / "m").out_dir
    table = json.loads((out / "coefficients.json").read_text())
    assert len(table["layers"]) == groups  # block: encoder.layer.0/1, plus 7 embedding and pooler tensors
    assert sum(len(v) for v in table["tensors"].values()) == 39


def test_adamerging_plus_plus_merges_ties_processed_vectors(family, tmp_path):
    out = run_merge(spec_for(family, parameters={**FAST, "steps": 3, "task_vectors": "ties", "density": 0.2}),
                    tmp_path / "m").out_dir
    table = json.loads((out / "coefficients.json").read_text())
    assert table["task_vectors"] == "ties"
    # Only entries kept by trim and agreeing with the elected sign move: most of the tensor stays at the base.
    changed = (body(out)[PROBE] != base_tensor(family, PROBE)).float().mean()
    assert 0.05 < float(changed) < 0.6


def test_tinting_trains_the_heads_and_nothing_else(family, tmp_path):
    out = run_merge(spec_for(family, "tinting", parameters={**FAST, "steps": 10}), tmp_path / "t").out_dir
    table = json.loads((out / "coefficients.json").read_text())
    for task in family.tasks:
        head = load_file(str(out / "heads" / f"{task.name}.safetensors"))
        expert = load_file(str(task / "model.safetensors"))
        assert set(head) == {"classifier.weight", "classifier.bias"}
        assert not torch.equal(head["classifier.weight"], expert["classifier.weight"])
    expected = base_tensor(family, PROBE) + sum(table["coefficients"][t.name][PROBE] * task_vector(family, k, PROBE)
                                                 for k, t in enumerate(family.tasks))
    torch.testing.assert_close(body(out)[PROBE], expected, atol=1e-6, rtol=1e-5)
    assert json.loads((out / "loss_curve.json").read_text())["metric"] == "cross_entropy"


def test_tinting_a_shared_tensor_gives_each_task_its_own_copy(family, tmp_path):
    tinted = "encoder.layer.1.output.dense.weight"
    out = run_merge(spec_for(family, "tinting", parameters={**FAST, "steps": 5, "tint": tinted}),
                    tmp_path / "t").out_dir
    copies = []
    for task in family.tasks:
        head = load_file(str(out / "heads" / f"{task.name}.safetensors"))
        expert = load_file(str(task / "model.safetensors"))
        assert torch.equal(head["classifier.weight"], expert["classifier.weight"])  # heads untouched
        copies.append(head[f"bert.{tinted}"])
    assert not torch.allclose(copies[0], copies[1]) and not torch.allclose(copies[0], body(out)[tinted])


def test_tinting_names_an_unknown_tensor(family, tmp_path):
    with pytest.raises(EngineError) as err:
        run_merge(spec_for(family, "tinting", parameters={"steps": 1, "tint": "encoder.nope"}), tmp_path / "t")
    assert err.value.code.value == "invalid_parameters" and "encoder.nope" in err.value.message
    assert not (tmp_path / "t").exists()


def test_lwptv_pruned_layers_keep_the_base_and_get_no_coefficient(family, tmp_path):
    lwptv = {"score": "saliency", "q": 0.1, "eta": 0.8}
    out = run_merge(spec_for(family, parameters={**FAST, "steps": 3}, lwptv=lwptv), tmp_path / "m").out_dir
    table = json.loads((out / "coefficients.json").read_text())
    report = json.loads((out / "lwptv.json").read_text())
    pruned_somewhere = 0
    for task in family.tasks:
        for layer, entry in report["tasks"][task.name]["layers"].items():
            assert (table["coefficients"][task.name][layer] is None) == (not entry["kept"])
            pruned_somewhere += not entry["kept"]
    assert pruned_somewhere
    everywhere = [layer for layer in table["layers"] if all(table["coefficients"][t.name][layer] is None
                                                            for t in family.tasks)]
    assert everywhere
    merged, base = body(out), load_file(str(family.base / "model.safetensors"))
    assert all(torch.equal(merged[n], base[n]) for n in everywhere)


def test_cancel_stops_between_steps_and_leaves_nothing(family, tmp_path):
    steps_seen = []

    def on_progress(p: Progress) -> None:
        if p.metrics:
            steps_seen.append(p.metrics["step"])
            if p.metrics["step"] == 3:
                raise Stop()

    with pytest.raises(Stop):
        run_merge(spec_for(family, parameters=FAST), tmp_path / "m", on_progress)
    assert steps_seen == [1, 2, 3]
    assert list(tmp_path.iterdir()) == []


def test_resumed_job_continues_from_saved_state(family, tmp_path):
    params = {**FAST, "steps": 8, "save_every": 2}
    whole = run_merge(spec_for(family, parameters=params), tmp_path / "whole").out_dir
    state = tmp_path / "state.safetensors"
    saved = []

    def stop_after_five(p: Progress) -> None:
        if p.metrics and p.metrics["step"] == 5:
            raise Stop()

    with pytest.raises(Stop):
        run_merge(spec_for(family, parameters=params), tmp_path / "a", stop_after_five,
                  resume=Resume(state, saved.append))
    assert saved == [state, state] and state.is_file()  # saved at steps 2 and 4
    steps = []
    resumed = run_merge(spec_for(family, parameters=params), tmp_path / "b",
                        lambda p: p.metrics and steps.append(p.metrics["step"]), resume=Resume(state)).out_dir
    assert steps == [5, 6, 7, 8]
    table = json.loads((resumed / "coefficients.json").read_text())
    assert table["resumed_from_step"] == 4
    assert table["coefficients"] == json.loads((whole / "coefficients.json").read_text())["coefficients"]
    assert json.loads((resumed / "loss_curve.json").read_text()) == json.loads((whole / "loss_curve.json").read_text())
    # A state saved for other parameters is not trusted: the run starts over.
    steps.clear()
    run_merge(spec_for(family, parameters={**params, "lr": 0.01}), tmp_path / "c",
              lambda p: p.metrics and steps.append(p.metrics["step"]), resume=Resume(state))
    assert steps[0] == 1


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str, str]]:
    root.mkdir(exist_ok=True)
    ids = torch.randint(5, 100, (8, 10))
    cases = {
        "empty": ("empty.jsonl", None, "invalid_data", "the file is empty"),
        "no_text": ("no_text.jsonl", '{"label": 1}\n', "invalid_data", "line 1: needs a non-empty string field"),
        "not_json": ("bad.jsonl", '{"text": "a"}\nnope\n', "invalid_data", "line 2: not JSON"),
        "float_ids": ("f.safetensors", {"input_ids": ids.float()}, "invalid_data", "2-D integer tensor"),
        "out_of_vocab": ("v.safetensors", {"input_ids": ids + 500}, "invalid_data", "outside the model's vocabulary"),
        "pixels_for_text": ("p.safetensors", {"pixel_values": torch.zeros(2, 3, 8, 8)}, "invalid_data",
                            "does not take pixel_values"),
        "unknown_key": ("u.safetensors", {"input_ids": ids, "labels": ids[:, 0]}, "invalid_data", "labels"),
        "mask_shape": ("m.safetensors", {"input_ids": ids, "attention_mask": ids[:, :3]}, "invalid_data",
                       "attention_mask must be"),
        "no_samples": ("n.safetensors", {"input_ids": ids[:0]}, "invalid_data", "non-zero number of samples"),
        "pickle": ("data.pt", b"\x80\x04", "unsafe_format", "pickle"),
        "csv": ("data.csv", "text\nhello\n", "invalid_data", "unknown format"),
    }
    out = {}
    for case, (name, content, code, fragment) in cases.items():
        path = root / case / name
        path.parent.mkdir()
        if isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(path))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content or "")
        out[case] = (path, code, fragment)
    return out


@pytest.mark.parametrize("case", ["empty", "no_text", "not_json", "float_ids", "out_of_vocab", "pixels_for_text",
                                  "unknown_key", "mask_shape", "no_samples", "pickle", "csv"])
def test_bad_inputs_are_refused_before_optimising(family, tmp_path, case):
    path, code, fragment = _bad_inputs(tmp_path / "inputs")[case]
    stages = []
    with pytest.raises(EngineError) as err:
        run_merge(spec_for(family, data=[family.data[0], path, family.data[2]], parameters={"steps": 2}),
                  tmp_path / "m", lambda p: stages.append(p.metrics))
    assert err.value.code.value == code, err.value.message
    assert fragment in err.value.message and (code != "invalid_data" or "task 'task1'" in err.value.message)
    assert not any(stages) and not (tmp_path / "m").exists()


def test_safetensors_inputs_are_read_per_batch_and_checked_in_full(tmp_path, monkeypatch):
    """A data file is never held whole: batches read their rows from disk, and the value checks read every row in
    small passes, down to a bad value in the last sample."""
    from types import SimpleNamespace

    from workers.engine.adaptive import data

    monkeypatch.setattr(data, "SCAN_BYTES", 3 * 4 * 8 * 8 * 5)  # 5 samples a pass: 20 samples take 4 passes
    config = SimpleNamespace(image_size=8, num_channels=3)
    pixels = torch.randn(20, 3, 8, 8)
    path = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": pixels}, str(path))
    inputs = data.load_task_data(path, "images", config, {"pixel_values"}, None, 128)
    assert len(inputs) == 20
    torch.testing.assert_close(inputs.batch(torch.tensor([19, 3]))["pixel_values"], pixels[[19, 3]])
    # Rewrite one sample in place: the next batch sees it, so nothing was kept from the first read.
    info = inputs.stored["pixel_values"].info
    with path.open("r+b") as f:
        f.seek(info.start + 3 * info.nbytes // 20)
        f.write(torch.full((3, 8, 8), 7.0).numpy().tobytes())
    assert bool((inputs.batch(torch.tensor([3]))["pixel_values"] == 7.0).all())
    pixels[19, 2, 7, 7] = float("nan")
    save_file({"pixel_values": pixels}, str(path))
    with pytest.raises(EngineError, match="NaN or Inf"):
        data.load_task_data(path, "images", config, {"pixel_values"}, None, 128)


def test_adaptive_methods_need_data_and_no_weights(family):
    with pytest.raises(ValueError, match="set `data` on every model"):
        MergeSpec.model_validate({"method": "adamerging", "base_model": str(family.base),
                                  "models": [{"model": str(t)} for t in family.tasks]})
    with pytest.raises(ValueError, match="learns the weights"):
        MergeSpec.model_validate({"method": "tinting", "base_model": str(family.base),
                                  "models": [{"model": str(family.tasks[0]), "data": "x.jsonl", "weight": 2}]})
    with pytest.raises(ValueError, match="uses no data"):
        MergeSpec.model_validate({"method": "ties", "base_model": str(family.base),
                                  "models": [{"model": str(family.tasks[0]), "data": "x.jsonl"}]})


def test_an_adaptation_that_cannot_fit_fails_before_loading(family, tmp_path, monkeypatch):
    from workers.engine.adaptive import memory

    numel = sum(t.numel() for t in load_file(str(family.base / "model.safetensors")).values())
    need = memory.resident_bytes(numel, len(family.tasks), torch.float32)
    assert need == numel * (12 + 4 * len(family.tasks))
    assert (memory.free_bytes(torch.device("cpu")) or need) >= need  # this machine holds the tiny model
    monkeypatch.setattr(memory, "free_bytes", lambda device: need - 1)
    stages = []
    with pytest.raises(EngineError) as err:
        run_merge(spec_for(family, parameters=FAST), tmp_path / "m", lambda p: stages.append(p.metrics))
    assert err.value.code.value == "insufficient_memory"
    assert "3 task vectors" in err.value.message and "bfloat16 halves" in err.value.message
    assert err.value.detail["needed_bytes"] == need and err.value.detail["free_bytes"] == need - 1
    assert not any(stages) and not (tmp_path / "m").exists()


@pytest.mark.parametrize("files", [{"memory.max": "3221225472\n", "memory.current": "1073741824\n"},
                                   {"memory/memory.limit_in_bytes": "3221225472\n",
                                    "memory/memory.usage_in_bytes": "1073741824\n"}], ids=["cgroup-v2", "cgroup-v1"])
def test_a_containers_memory_limit_bounds_what_is_free(tmp_path, monkeypatch, files):
    from workers.engine.adaptive import memory

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    assert memory.free_bytes(torch.device("cpu")) == 2 << 30  # this machine has more than 2 GiB available
    (tmp_path / next(iter(files))).write_text("max\n" if "memory.max" in files else str(1 << 62))
    assert memory.free_bytes(torch.device("cpu")) > 2 << 30  # no limit: the kernel's available memory


def test_running_out_of_device_memory_mid_run_is_a_clear_failure(family, tmp_path, monkeypatch):
    from workers.engine.adaptive.loop import Adaptation

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Adaptation, "logits", exhausted)
    with pytest.raises(EngineError) as err:
        run_merge(spec_for(family, parameters={**FAST, "batch_size": 8}), tmp_path / "m")
    assert err.value.code.value == "insufficient_memory"
    assert "batch of 8 inputs" in err.value.message and not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_bfloat16_task_vectors_follow_float32(family, tmp_path, method):
    """The CUDA default holds task vectors in bfloat16 (merge and coefficient gradient in bf16 matvecs); the same
    path runs here on the CPU and must learn what float32 learns, to bf16 precision. Adam's first steps move a
    coefficient by lr times the sign of its gradient, so a gradient near zero may flip sign under bf16 rounding:
    the comparison is on the bulk (90%) of the coefficients, not the worst one."""
    params = {**FAST, "steps": 5}
    runs = {dtype: run_merge(spec_for(family, method, parameters={**params, "compute_dtype": dtype}),
                             tmp_path / dtype).out_dir for dtype in ("float32", "bfloat16")}
    a, b = (json.loads((runs[d] / "coefficients.json").read_text())["coefficients"] for d in ("float32", "bfloat16"))
    moved = sorted(abs(a[t][layer] - 0.3) for t in a for layer in a[t])
    differ = sorted(abs(a[t][layer] - b[t][layer]) for t in a for layer in a[t])
    p90 = int(0.9 * len(differ))
    assert moved[p90] > 0.1 and differ[p90] < 0.1 * moved[p90], (moved[p90], differ[p90])
    losses = [json.loads((runs[d] / "loss_curve.json").read_text())["points"][-1]["loss"] for d in runs]
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_cuda_adaptation_matches_cpu(family, tmp_path, method):
    params = {**FAST, "steps": 5, "compute_dtype": "float32"}
    cpu = run_merge(spec_for(family, method, parameters=params), tmp_path / "cpu", device="cpu").out_dir
    gpu = run_merge(spec_for(family, method, parameters=params), tmp_path / "gpu", device="cuda").out_dir
    a = json.loads((cpu / "coefficients.json").read_text())["coefficients"]
    b = json.loads((gpu / "coefficients.json").read_text())["coefficients"]
    for task in a:
        for layer in a[task]:
            assert abs(a[task][layer] - b[task][layer]) < 2e-3
    bf16 = run_merge(spec_for(family, method, parameters={**FAST, "steps": 5}), tmp_path / "bf16", device="cuda")
    assert bf16.manifest["engine"]["device"] == "cuda"
