"""Bad inputs give a precise EngineError (code, file, tensor) and leave no output and no `.partial` folder."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_safetensors

from workers.engine.errors import EngineError, ErrorCode
from workers.engine.merge import run_merge
from workers.engine.safetensors_format import read_header_file
from workers.engine.spec import MergeSpec

MERGEFORGE = [shutil.which("mergeforge")] if shutil.which("mergeforge") else [sys.executable, "-m",
                                                                            "workers.engine.cli"]
SHAPES = {"enc.0.weight": (8, 4), "enc.0.bias": (8,), "enc.1.weight": (4, 8), "enc.1.bias": (4,)}


def _tensors(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.fixture
def base(tmp_path) -> Path:
    return write_safetensors(tmp_path / "base" / "model.safetensors", _tensors(0)).parent


@pytest.fixture
def good_task(tmp_path) -> Path:
    return write_safetensors(tmp_path / "good" / "model.safetensors", _tensors(1)).parent


def _spec(base: Path | str, *models: Path | str, method: str = "task_arithmetic", **extra) -> MergeSpec:
    return MergeSpec.model_validate({"method": method, "base_model": str(base),
                                     "models": [{"model": str(m)} for m in models], **extra})


def _leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial"))


def _fails(spec: MergeSpec, out: Path, code: ErrorCode, *words: str, progress=None) -> EngineError:
    """Run the merge, expect `code` with every word in the message, and nothing left behind."""
    with pytest.raises(EngineError) as info:
        run_merge(spec, out, progress)
    err = info.value
    assert err.code == code, f"{err.code}: {err.message}"
    for word in words:
        assert word in err.message, f"{word!r} not in {err.message!r}"
    assert not out.exists(), f"{out} was left behind"
    assert _leftovers(out) == [], "a .partial folder was left behind"
    return err


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly this header, whatever it claims, followed by `data`."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --- missing and unsafe inputs ---------------------------------------------------------------------------------


def test_missing_base_path(tmp_path, good_task):
    missing = tmp_path / "no-such-base"
    err = _fails(_spec(missing, good_task), tmp_path / "out", ErrorCode.INPUT_NOT_FOUND, str(missing),
                 "no such file or folder")
    assert err.detail["path"] == str(missing)


def test_missing_model_path(tmp_path, base, good_task):
    missing = tmp_path / "nowhere" / "task.safetensors"
    _fails(_spec(base, good_task, missing), tmp_path / "out", ErrorCode.INPUT_NOT_FOUND, str(missing),
           "no such file or folder")


def test_folder_with_only_pytorch_model_bin(tmp_path, base):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(_tensors(1), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    err = _fails(_spec(base, folder), tmp_path / "out", ErrorCode.UNSAFE_FORMAT, "pytorch_model.bin", "pickle",
                 "arbitrary code", "save_pretrained", "safe_serialization=True")
    assert err.detail["file"] == str(folder / "pytorch_model.bin")


def test_pt_file_given_directly(tmp_path, base):
    pt = tmp_path / "task.pt"
    torch.save(_tensors(1), pt)
    _fails(_spec(base, pt), tmp_path / "out", ErrorCode.UNSAFE_FORMAT, str(pt), "pickle", "arbitrary code",
           "Convert")


# --- incompatible checkpoints ---------------------------------------------------------------------------------


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, base):
    task = write_safetensors(tmp_path / "t" / "model.safetensors",
                             _tensors(1, {**SHAPES, "enc.1.weight": (4, 6)})).parent
    err = _fails(_spec(base, task), tmp_path / "out", ErrorCode.INCOMPATIBLE_CHECKPOINTS, "enc.1.weight",
                 "[4, 8]", "[4, 6]")
    assert err.detail["mismatched"] == [{"tensor": "enc.1.weight", "model": "t", "shape": [4, 6], "dtype": "F32",
                                         "base_shape": [4, 8]}]
    assert "enc.0.weight" not in err.message


def test_task_missing_tensors_names_them(tmp_path, base, good_task):
    shapes = {k: v for k, v in SHAPES.items() if k not in ("enc.1.weight", "enc.0.bias")}
    task = write_safetensors(tmp_path / "partial_task" / "model.safetensors", _tensors(2, shapes)).parent
    err = _fails(_spec(base, good_task, task), tmp_path / "out", ErrorCode.INCOMPATIBLE_CHECKPOINTS,
                 "'partial_task'", "lacks 2 tensor(s)", "enc.1.weight", "enc.0.bias")
    assert sorted(err.detail["missing"]["partial_task"]) == ["enc.0.bias", "enc.1.weight"]
    assert "good" not in err.detail["missing"]


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_task_tensor_fails_during_the_merge(tmp_path, base, good_task, bad_value):
    tensors = _tensors(3)
    base_header = read_header_file(base / "model.safetensors").tensors
    last = max(base_header, key=lambda n: base_header[n].start)  # merged last: earlier tensors are written first
    tensors[last][1, 2] = bad_value
    task_file = write_safetensors(tmp_path / "poisoned" / "model.safetensors", tensors)
    out = tmp_path / "out"
    seen_partial = []

    def progress(p):
        seen_partial.append(bool(_leftovers(out)))

    err = _fails(_spec(base, good_task, task_file.parent), out, ErrorCode.INVALID_CHECKPOINT, repr(last),
                 str(task_file), "NaN or Inf", progress=progress)
    assert err.detail["tensor"] == last and err.detail["non_finite"] == 1
    assert seen_partial and all(seen_partial), "the error should come while the merge is writing its output"


# --- broken safetensors files ---------------------------------------------------------------------------------


def test_empty_safetensors_file(tmp_path, base):
    empty = tmp_path / "empty" / "model.safetensors"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    _fails(_spec(base, empty.parent), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(empty), "empty",
           "0 bytes")


def test_empty_safetensors_file_given_directly_as_base(tmp_path, good_task):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _fails(_spec(empty, good_task), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(empty), "0 bytes")


def test_truncated_safetensors_file(tmp_path, base):
    good = write_safetensors(tmp_path / "full" / "model.safetensors", _tensors(1))
    header = read_header_file(good)
    middle = header.data_start + (good.stat().st_size - header.data_start) // 2
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:middle])
    _fails(_spec(base, cut.parent), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(cut), "truncated",
           "past the end")


def test_file_shorter_than_its_header(tmp_path, base):
    good = write_safetensors(tmp_path / "full" / "model.safetensors", _tensors(1))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:40])
    _fails(_spec(base, cut), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(cut), "truncated")


def _f32(n: int) -> bytes:
    return torch.arange(n, dtype=torch.float32).numpy().tobytes()


def test_header_size_does_not_match_shape_and_dtype(tmp_path):
    header = {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},
              "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [20, 28]}}
    liar = _raw_safetensors(tmp_path / "liar.safetensors", header, _f32(7))
    good = write_safetensors(tmp_path / "good.safetensors", {"a.weight": torch.zeros(2, 3), "a.bias": torch.ones(2)})
    _fails(_spec(good, liar), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(liar), "'a.weight'",
           "20 bytes", "[2, 3]", "needs 24")


def test_header_offsets_past_end_of_file(tmp_path):
    header = {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    liar = _raw_safetensors(tmp_path / "liar.safetensors", header, _f32(7))  # 28 bytes of data, 32 claimed
    good = write_safetensors(tmp_path / "good.safetensors", {"a.weight": torch.zeros(2, 3), "a.bias": torch.ones(2)})
    _fails(_spec(good, liar), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(liar), "'a.bias'",
           "past the end", "28 bytes")


def test_header_overlapping_offsets(tmp_path):
    header = {"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    liar = _raw_safetensors(tmp_path / "liar.safetensors", header, _f32(6))
    good = write_safetensors(tmp_path / "good.safetensors", {"a.weight": torch.zeros(2, 3), "a.bias": torch.ones(2)})
    # As base and as task model: the header is checked wherever the file appears.
    for spec in (_spec(good, liar), _spec(liar, good)):
        _fails(spec, tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(liar), "overlaps", "the header lies")


def test_header_not_json(tmp_path, base):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 8)
    _fails(_spec(base, junk), tmp_path / "out", ErrorCode.INVALID_CHECKPOINT, str(junk), "not valid JSON")


# --- output folder ---------------------------------------------------------------------------------------------


def test_existing_non_empty_output_is_refused(tmp_path, base, good_task):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(EngineError) as info:
        run_merge(_spec(base, good_task), out)
    assert info.value.code == ErrorCode.INVALID_PARAMETERS
    assert str(out) in info.value.message and "not an empty folder" in info.value.message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert _leftovers(out) == []


def test_existing_file_as_output_is_refused(tmp_path, base, good_task):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(EngineError) as info:
        run_merge(_spec(base, good_task), out)
    assert info.value.code == ErrorCode.INVALID_PARAMETERS
    assert out.read_text() == "a file"
    assert _leftovers(out) == []


def test_existing_empty_output_folder_is_used(tmp_path, base, good_task):
    out = tmp_path / "out"
    out.mkdir()
    run_merge(_spec(base, good_task), out)
    assert (out / "model.safetensors").is_file()
    assert _leftovers(out) == []


# --- through the command line ----------------------------------------------------------------------------------


def _cli(tmp_path: Path, spec: dict) -> tuple[subprocess.CompletedProcess, Path]:
    spec_file = tmp_path / "spec.yml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "cli-out"
    proc = subprocess.run([*MERGEFORGE, "merge", str(spec_file), str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_cli_unknown_method_exits_2(tmp_path, base, good_task):
    proc, out = _cli(tmp_path, {"method": "frankenmerge", "base_model": str(base),
                                "models": [{"model": str(good_task)}]})
    assert proc.returncode == 2, proc.stderr
    assert "invalid SPEC" in proc.stderr
    assert "unknown merge method 'frankenmerge'" in proc.stderr
    assert "ties" in proc.stderr and "task_arithmetic" in proc.stderr  # lists what is available
    assert "Traceback" not in proc.stderr
    assert not out.exists() and _leftovers(out) == []


def test_cli_out_of_range_parameter_exits_2(tmp_path, base, good_task):
    proc, out = _cli(tmp_path, {"method": "ties", "base_model": str(base), "models": [{"model": str(good_task)}],
                                "parameters": {"density": 1.5}})
    assert proc.returncode == 2, proc.stderr
    assert "invalid SPEC" in proc.stderr
    assert "density" in proc.stderr and "less than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and _leftovers(out) == []


def test_cli_engine_error_exits_1_with_code(tmp_path, base):
    missing = tmp_path / "gone"
    proc, out = _cli(tmp_path, {"method": "task_arithmetic", "base_model": str(base),
                                "models": [{"model": str(missing)}]})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error [input_not_found]: ")
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists() and _leftovers(out) == []
