"""The CUDA path of the engine: the same merges on the GPU give the CPU's tensors. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workers.engine.merge import resolve_device, run_merge
from workers.engine.spec import MergeSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_device_is_cuda_only_when_present():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@cuda
@pytest.mark.parametrize(("method", "parameters", "extra"), [
    ("task_arithmetic", {"lambda": 0.5}, {}),
    ("ties", {"density": 0.3}, {}),
    ("ties", {"density": 0.3, "scope": "global"}, {"lwptv": {"q": 0.2}}),
    ("dare_ties", {"drop_rate": 0.3}, {"seed": 3}),
    ("linear", {}, {}),
])
def test_cuda_merge_equals_cpu_merge(bert_family, tmp_path, method, parameters, extra):
    spec = MergeSpec.model_validate({"method": method, "base_model": str(bert_family.base),
                                     "models": [{"model": str(t)} for t in bert_family.tasks],
                                     "parameters": parameters, **extra})
    on_cpu = run_merge(spec, tmp_path / "cpu", device="cpu")
    on_gpu = run_merge(spec, tmp_path / "gpu", device="cuda")
    assert on_gpu.manifest["engine"]["device"] == "cuda" and on_cpu.manifest["engine"]["device"] == "cpu"
    a = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    b = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
