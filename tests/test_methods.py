"""Every merge formula on small float32 tensors, against values computed by hand in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_safetensors

from workers.engine import tensors as tensors_module
from workers.engine.checkpoint import Checkpoint
from workers.engine.methods import all_methods, get_method
from workers.engine.methods.dare_linear import DareLinear
from workers.engine.methods.dare_ties import DareTies
from workers.engine.methods.linear import Linear
from workers.engine.methods.slerp import Slerp
from workers.engine.methods.task_arithmetic import TaskArithmetic
from workers.engine.methods.ties import Cut, Ties, per_tensor_cuts
from workers.engine.tensors import Chunk, TensorSource

REPO = Path(__file__).resolve().parents[1]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def chunk(base, models, weights=None, seed=0, name="w", index=0) -> Chunk:
    """A Chunk as TensorSource builds one: float32 base, the task models stacked [task, *rows]."""
    base = t(base) if not isinstance(base, torch.Tensor) else base
    stacked = torch.stack([t(m) if not isinstance(m, torch.Tensor) else m for m in models])
    return Chunk(name, index, base, stacked, list(weights or [1.0] * len(models)), seed)


def merge(method_cls, params: dict, c: Chunk, state=None) -> torch.Tensor:
    return method_cls().merge(method_cls.Params.model_validate(params), c, state)


@pytest.fixture
def make_source(tmp_path):
    """A real TensorSource over tiny safetensors files: base plus one file per task model."""
    opened: list[Checkpoint] = []

    def build(name: str, base: torch.Tensor, models: list[torch.Tensor], weights=None, seed=0):
        tag = len(opened)
        b = Checkpoint.open(str(write_safetensors(tmp_path / f"s{tag}" / "base.safetensors", {name: base})))
        ms = [Checkpoint.open(str(write_safetensors(tmp_path / f"s{tag}" / f"m{k}.safetensors", {name: m})))
              for k, m in enumerate(models)]
        opened.extend([b, *ms])
        n = len(models)
        return TensorSource(name, b, ms, [name] * n, [False] * n, list(weights or [1.0] * n), seed)

    yield build
    for ckpt in opened:
        ckpt.close()


# --------------------------------------------------------------------------------------------------- registry

def test_registry_lists_every_method_with_a_json_schema():
    methods = all_methods()
    assert set(methods) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "adamerging",
                            "tinting"}
    for name, cls in methods.items():
        described = cls.describe()
        assert described["name"] == name
        assert described["summary"]
        schema = described["parameters"]
        assert schema["type"] == "object"
        json.dumps(schema)  # serialisable as JSON
    assert set(methods["ties"].describe()["parameters"]["properties"]) == {
        "density", "lambda", "consensus", "merge", "scope"}
    assert methods["ties"].describe()["parameters"]["properties"]["density"]["maximum"] == 1.0
    assert methods["slerp"].describe()["models"] == {"min": 1, "max": 1}
    assert methods["linear"].describe()["models"] == {"min": 1, "max": None}
    assert get_method("ties") is Ties
    listed = "available: adamerging, dare_linear, dare_ties, linear, slerp, task_arithmetic, ties, tinting"
    with pytest.raises(KeyError, match=listed):
        get_method("nope")


def test_methods_and_spec_import_without_torch():
    code = (
        "import sys\n"
        "import workers.engine.methods as m\n"
        "import workers.engine.spec as s\n"
        "assert len(m.all_methods()) == 8\n"
        "s.MergeSpec.model_validate({'method': 'ties', 'base_model': 'b', 'models': [{'model': 'x'}],"
        " 'parameters': {'density': 0.5}})\n"
        "for cls in m.all_methods().values(): cls.describe()\n"
        "loaded = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
        "print('TORCH' if loaded else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CLEAN"


def test_unknown_parameter_keys_are_errors():
    from pydantic import ValidationError

    for cls in all_methods().values():
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            cls.Params.model_validate({"no_such_parameter": 1})


# ----------------------------------------------------------------------------------------------------- linear

def test_linear_weighted_average_normalized():
    # (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5, (1*3 + 3*7)/4 = 6; the base plays no part.
    c = chunk([100.0, -100.0, 7.0], [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]], weights=[1.0, 3.0])
    assert torch.equal(merge(Linear, {}, c), t([4.0, 5.0, 6.0]))
    assert torch.equal(merge(Linear, {"normalize": True}, c), t([4.0, 5.0, 6.0]))


def test_linear_unnormalized_is_the_weighted_sum():
    c = chunk([100.0, -100.0, 7.0], [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]], weights=[1.0, 3.0])
    assert torch.equal(merge(Linear, {"normalize": False}, c), t([16.0, 20.0, 24.0]))


def test_linear_equal_weights_is_the_mean():
    c = chunk([0.0, 0.0], [[1.0, -2.0], [2.0, 4.0], [6.0, 1.0]])
    assert torch.equal(merge(Linear, {}, c), t([3.0, 1.0]))


def test_linear_zero_total_weight_does_not_divide():
    c = chunk([9.0, 9.0], [[1.0, 2.0], [3.0, 4.0]], weights=[0.0, 0.0])
    out = merge(Linear, {}, c)
    assert torch.equal(out, t([0.0, 0.0]))


# -------------------------------------------------------------------------------------------- task arithmetic

def test_task_arithmetic_lambda_and_weights():
    # tau1 = [1, 2, 0, 0], tau2 = [0, 0, 4, -2]; 1 + 0.5 * (1*tau1 + 2*tau2) = [1.5, 2, 5, -1]
    c = chunk([1.0, 1.0, 1.0, 1.0], [[2.0, 3.0, 1.0, 1.0], [1.0, 1.0, 5.0, -1.0]], weights=[1.0, 2.0])
    assert torch.equal(merge(TaskArithmetic, {"lambda": 0.5}, c), t([1.5, 2.0, 5.0, -1.0]))


def test_task_arithmetic_default_lambda_is_0_3():
    assert TaskArithmetic.Params.model_validate({}).lambda_ == 0.3
    # tau1 + tau2 = [1, 2, 4, -2]; 1 + 0.3 * that = [1.3, 1.6, 2.2, 0.4]
    c = chunk([1.0, 1.0, 1.0, 1.0], [[2.0, 3.0, 1.0, 1.0], [1.0, 1.0, 5.0, -1.0]])
    torch.testing.assert_close(merge(TaskArithmetic, {}, c), t([1.3, 1.6, 2.2, 0.4]))


def test_task_arithmetic_negative_lambda_subtracts():
    c = chunk([1.0, 2.0], [[3.0, 2.0]])
    assert torch.equal(merge(TaskArithmetic, {"lambda": -1.0}, c), t([-1.0, 2.0]))


def test_task_arithmetic_leaves_the_chunk_base_untouched():
    base = t([1.0, 2.0])
    c = chunk(base, [[3.0, 5.0]])
    merge(TaskArithmetic, {"lambda": 1.0}, c)
    assert torch.equal(base, t([1.0, 2.0]))


# ------------------------------------------------------------------------------------------------------ TIES
# Six entries, three task vectors (base 0):
#   tau1 = [ 3, -1,  2,  1, 0,  2]
#   tau2 = [-1, -1, -2, -1, 0,  4]
#   tau3 = [-1,  4,  0,  0, 0, -1]
TAU1 = [3.0, -1.0, 2.0, 1.0, 0.0, 2.0]
TAU2 = [-1.0, -1.0, -2.0, -1.0, 0.0, 4.0]
TAU3 = [-1.0, 4.0, 0.0, 0.0, 0.0, -1.0]
NO_TRIM = [Cut(0.0)] * 3


def test_ties_sign_by_sum_disjoint_mean():
    # sums [1, 2, 0, 0, 0, 5] -> elected [+, +, + (tie), + (tie), +, +]
    # agreeing: e0 tau1 (3); e1 tau3 (4); e2 tau1 (2); e3 tau1 (1); e4 none (0); e5 tau1, tau2 -> (2+4)/2 = 3
    c = chunk([0.0] * 6, [TAU1, TAU2, TAU3])
    out = merge(Ties, {"consensus": "sum", "merge": "mean"}, c, NO_TRIM)
    assert torch.equal(out, t([3.0, 4.0, 2.0, 1.0, 0.0, 3.0]))


def test_ties_sign_by_sum_disjoint_sum():
    c = chunk([0.0] * 6, [TAU1, TAU2, TAU3])
    out = merge(Ties, {"consensus": "sum", "merge": "sum"}, c, NO_TRIM)
    assert torch.equal(out, t([3.0, 4.0, 2.0, 1.0, 0.0, 6.0]))


def test_ties_sign_by_count():
    # sign counts [+1-1-1, -1-1+1, +1-1+0, +1-1+0, 0, +1+1-1] = [-1, -1, 0, 0, 0, +1]
    # elected [-, -, + (tie), + (tie), +, +]
    # e0: tau2, tau3 -> (-1-1)/2 = -1; e1: tau1, tau2 -> -1; e2: tau1 -> 2; e3: tau1 -> 1; e5: (2+4)/2 = 3
    c = chunk([0.0] * 6, [TAU1, TAU2, TAU3])
    out = merge(Ties, {"consensus": "count", "merge": "mean"}, c, NO_TRIM)
    assert torch.equal(out, t([-1.0, -1.0, 2.0, 1.0, 0.0, 3.0]))
    out_sum = merge(Ties, {"consensus": "count", "merge": "sum"}, c, NO_TRIM)
    assert torch.equal(out_sum, t([-2.0, -2.0, 2.0, 1.0, 0.0, 6.0]))


def test_ties_weights_and_lambda():
    # weights [1, 2, 1]: d1 = tau1, d2 = 2*tau2 = [-2, -2, -4, -2, 0, 8], d3 = tau3
    # sum d = [0, 1, -2, -1, 0, 9] -> elected [+ (tie), +, -, -, +, +]
    # mean divides by the weights of the agreeing tasks:
    #   e0: d1 = 3 / w1 = 1 -> 3;  e1: d3 = 4 / 1 -> 4;  e2: d2 = -4 / w2 = 2 -> -2;  e3: -2 / 2 -> -1
    #   e4: 0;  e5: (d1 + d2) / (w1 + w2) = 10 / 3
    # base 1, lambda 0.5: 1 + 0.5 * merged
    c = chunk([1.0] * 6, [[1.0 + x for x in tau] for tau in (TAU1, TAU2, TAU3)], weights=[1.0, 2.0, 1.0])
    out = merge(Ties, {"lambda": 0.5}, c, NO_TRIM)
    torch.testing.assert_close(out, t([2.5, 3.0, 0.0, 0.5, 1.0, 1.0 + 0.5 * 10.0 / 3.0]))
    out_sum = merge(Ties, {"lambda": 0.5, "merge": "sum"}, c, NO_TRIM)
    # disjoint sum: [3, 4, -4, -2, 0, 10]
    assert torch.equal(out_sum, t([2.5, 3.0, -1.0, 0.0, 1.0, 6.0]))


def test_ties_trim_uses_each_tasks_threshold():
    # tau1 = [0.5, -3, 2, 1], threshold 2 -> [0, -3, 2, 0] (entries equal to the threshold are kept)
    # tau2 = [4, 1, -1, 0.25], threshold 1 -> [4, 1, -1, 0]
    # sums [4, -2, 1, 0] -> [+, -, +, + (tie)]; e0: 4; e1: -3; e2: tau1 2; e3: nothing agrees -> 0
    c = chunk([10.0] * 4, [[10.5, 7.0, 12.0, 11.0], [14.0, 11.0, 9.0, 10.25]])
    out = merge(Ties, {"lambda": 1.0}, c, [Cut(2.0), Cut(1.0)])
    assert torch.equal(out, t([14.0, 7.0, 12.0, 10.0]))


def test_ties_defaults_and_scope():
    params = Ties.Params.model_validate({})
    assert (params.density, params.lambda_, params.consensus, params.merge, params.scope) == (
        0.2, 1.0, "sum", "mean", "tensor")
    assert Ties().global_fraction(params) is None
    glob = Ties.Params.model_validate({"density": 0.3, "scope": "global"})
    assert Ties().global_fraction(glob) == 0.3
    assert Ties().tensor_state(glob, None, [0.5, 0.25]) == [Cut(0.5), Cut(0.25)]


def test_ties_per_tensor_thresholds_from_a_tensor_source(make_source):
    # |tau1| = [0.5, 3, 2, 1, 4, 0.25] (sorted: 4, 3, 2, 1, 0.5, 0.25); |tau2| = [1, 1, 8, 0, 2, 6]
    base = t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    m1 = t([[1.5, -2.0, 3.0], [2.0, 5.0, 1.25]])
    m2 = t([[2.0, 0.0, 9.0], [1.0, -1.0, 7.0]])
    source = make_source("w", base, [m1, m2])
    # density 0.5 of 6 -> keep 3: third largest of |tau1| is 2, of |tau2| (8, 6, 2, 1, 1, 0) is 2
    assert per_tensor_cuts(source, 0.5) == [Cut(2.0), Cut(2.0)]
    # density 0.2 of 6 -> int(1.2) = 1: the largest
    assert per_tensor_cuts(source, 0.2) == [Cut(4.0), Cut(8.0)]
    # density 1 keeps all
    assert per_tensor_cuts(source, 1.0) == [Cut(0.0), Cut(0.0)]
    params = Ties.Params.model_validate({"density": 0.5, "lambda": 1.0})
    state = Ties().tensor_state(params, source, None)
    assert state == [Cut(2.0), Cut(2.0)]
    # tau1 = [0.5, -3, 2, 1, 4, 0.25] trimmed at 2 -> [0, -3, 2, 0, 4, 0]
    # tau2 = [1, -1, 8, 0, -2, 6] trimmed at 2 -> [0, 0, 8, 0, -2, 6]
    # sums [0, -3, 10, 0, 2, 6] -> [+, -, +, +, +, +]
    # e0: none -> 0; e1: -3; e2: (2+8)/2 = 5; e3: 0; e4: tau1 4 (tau2 -2 disagrees); e5: 6
    out = torch.cat([Ties().merge(params, c, state) for c in source.chunks()])
    assert torch.equal(out, t([[1.0, -2.0, 6.0], [1.0, 5.0, 7.0]]))


def test_ties_per_tensor_thresholds_span_every_chunk(make_source, monkeypatch):
    # One row per chunk: the threshold must still rank the whole tensor.
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 2)
    base = torch.zeros(4, 2)
    m1 = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    source = make_source("w", base, [m1])
    assert len(source.row_ranges) == 4
    # density 0.25 of 8 -> keep 2 -> 7
    assert per_tensor_cuts(source, 0.25) == [Cut(7.0)]


def test_ties_per_tensor_trim_keeps_exactly_k_breaking_ties_by_position(make_source, monkeypatch):
    # |tau| = [1 2 2 2 | 3 2 2 1 | 2 2 5 0 | 0 0 0 2], one row per chunk; density 0.25 of 16 -> k = 4:
    # 5 and 3, then the first two 2s in storage order (flat indices 1 and 2), nothing else tied at 2.
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 4)
    base = torch.zeros(4, 4)
    m1 = t([[1.0, 2.0, -2.0, 2.0], [3.0, 2.0, 2.0, 1.0], [2.0, 2.0, 5.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    source = make_source("w", base, [m1])
    assert per_tensor_cuts(source, 0.25) == [Cut(2.0, 2)]
    params = Ties.Params.model_validate({"density": 0.25, "lambda": 1.0})
    state = Ties().tensor_state(params, source, None)
    out = torch.cat([Ties().merge(params, c, state) for c in source.chunks()])
    assert torch.equal(out, t([[0.0, 2.0, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0] * 4]))


# ------------------------------------------------------------------------------------------------------- DARE

def test_dare_linear_drop_rate_zero_is_task_arithmetic():
    c = chunk([1.0, 1.0, 1.0, 1.0], [[2.0, 3.0, 1.0, 1.0], [1.0, 1.0, 5.0, -1.0]], weights=[1.0, 2.0], seed=3)
    out = merge(DareLinear, {"drop_rate": 0.0, "lambda": 0.5}, c)
    assert torch.equal(out, t([1.5, 2.0, 5.0, -1.0]))
    assert torch.equal(out, merge(TaskArithmetic, {"lambda": 0.5}, c))


def test_dare_ties_drop_rate_zero_is_ties_without_trim():
    c = chunk([1.0] * 6, [[1.0 + x for x in tau] for tau in (TAU1, TAU2, TAU3)], weights=[1.0, 2.0, 1.0])
    out = merge(DareTies, {"drop_rate": 0.0, "lambda": 0.5}, c)
    torch.testing.assert_close(out, t([2.5, 3.0, 0.0, 0.5, 1.0, 1.0 + 0.5 * 10.0 / 3.0]))
    assert torch.equal(out, merge(Ties, {"lambda": 0.5}, c, NO_TRIM))
    out_count = merge(DareTies, {"drop_rate": 0.0, "consensus": "count", "merge": "sum"},
                      chunk([0.0] * 6, [TAU1, TAU2, TAU3]))
    assert torch.equal(out_count, t([-2.0, -2.0, 2.0, 1.0, 0.0, 6.0]))


def test_dare_defaults():
    lin = DareLinear.Params.model_validate({})
    assert (lin.drop_rate, lin.rescale, lin.lambda_) == (0.5, True, 0.3)
    ties = DareTies.Params.model_validate({})
    assert (ties.drop_rate, ties.rescale, ties.lambda_, ties.consensus, ties.merge) == (
        0.5, True, 1.0, "sum", "mean")


N_BIG = 200_000


def _big_tau(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tau = torch.rand(N_BIG, generator=g) + 0.5  # every entry nonzero, in [0.5, 1.5)
    sign = torch.where(torch.rand(N_BIG, generator=g) < 0.5, -1.0, 1.0)
    return tau * sign


@pytest.mark.parametrize("drop_rate", [0.75, 0.3, 0.9])
def test_dare_linear_keeps_about_one_minus_p_and_rescales_survivors(drop_rate):
    tau = _big_tau()
    c = chunk(torch.zeros(N_BIG), [tau.clone()], seed=11, name="layer.weight")
    out = merge(DareLinear, {"drop_rate": drop_rate, "lambda": 1.0}, c)
    kept = out != 0
    fraction = kept.float().mean().item()
    # binomial standard deviation sqrt(p (1-p) / n) <= 0.0012: 6 sigma
    assert abs(fraction - (1.0 - drop_rate)) < 0.007
    expected = tau[kept] / (1.0 - drop_rate)
    if drop_rate == 0.75:
        assert torch.equal(out[kept], tau[kept] * 4.0)  # 1/(1-0.75) = 4 exactly
    torch.testing.assert_close(out[kept], expected, rtol=1e-6, atol=0.0)


def test_dare_dropped_entries_are_exactly_the_base_and_survivors_base_plus_rescaled_tau():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-8, 8, (10_000,), generator=g).float()
    tau = torch.randint(1, 16, (10_000,), generator=g).float() / 4.0  # exact in float32, nonzero
    c = chunk(base, [base + tau], seed=2, name="x")
    out = merge(DareLinear, {"drop_rate": 0.5, "lambda": 1.0}, c)
    changed = out != base
    assert 0.45 < changed.float().mean().item() < 0.55
    assert torch.equal(out[changed], base[changed] + 2.0 * tau[changed])
    assert torch.equal(out[~changed], base[~changed])


def test_dare_without_rescale_keeps_survivors_unscaled():
    tau = _big_tau(1)
    c = chunk(torch.zeros(N_BIG), [tau.clone()], seed=4)
    out = merge(DareLinear, {"drop_rate": 0.6, "rescale": False, "lambda": 1.0}, c)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.007
    assert torch.equal(out[kept], tau[kept])


def test_dare_ties_single_task_keeps_rescaled_survivors():
    # One task: elected sign is that of each survivor, disjoint mean divides by w = 1.
    tau = _big_tau(2)
    c = chunk(torch.zeros(N_BIG), [tau.clone()], seed=8)
    out = merge(DareTies, {"drop_rate": 0.75, "lambda": 1.0}, c)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.007
    assert torch.equal(out[kept], tau[kept] * 4.0)


def test_dare_masks_are_independent_per_task():
    tau = _big_tau(3)
    c = chunk(torch.zeros(N_BIG), [tau.clone(), tau.clone()], weights=[1.0, 0.0], seed=1)
    only_first = merge(DareLinear, {"drop_rate": 0.5, "lambda": 1.0}, c)
    c2 = chunk(torch.zeros(N_BIG), [tau.clone(), tau.clone()], weights=[0.0, 1.0], seed=1)
    only_second = merge(DareLinear, {"drop_rate": 0.5, "lambda": 1.0}, c2)
    both_kept = ((only_first != 0) & (only_second != 0)).float().mean().item()
    assert abs(both_kept - 0.25) < 0.007  # independent masks overlap on p_keep^2 of the entries


def test_dare_same_seed_same_bytes_other_seed_differs():
    tau = _big_tau(4)
    params = {"drop_rate": 0.5, "lambda": 1.0}

    def run(seed, name="w", index=0):
        c = chunk(torch.zeros(N_BIG), [tau.clone()], seed=seed, name=name, index=index)
        return merge(DareLinear, params, c)

    first = run(7)
    torch.manual_seed(12345)  # the global RNG plays no part
    assert torch.equal(run(7), first)
    assert not torch.equal(run(8), first)
    assert not torch.equal(run(7, name="v"), first)
    assert not torch.equal(run(7, index=1), first)
    first_ties = merge(DareTies, params, chunk(torch.zeros(N_BIG), [tau.clone()], seed=7))
    assert torch.equal(first_ties != 0, first != 0)  # same (seed, tensor, chunk, task): same mask


def test_dare_is_independent_of_call_order():
    taus = [_big_tau(5)[:1000], _big_tau(6)[:1000]]
    params = {"drop_rate": 0.5, "lambda": 1.0}
    chunks = {name: chunk(torch.zeros(1000), [x.clone() for x in taus], seed=3, name=name) for name in "ab"}
    forward = {name: merge(DareLinear, params, chunks[name]) for name in ["a", "b"]}
    torch.manual_seed(0)
    torch.rand(10)
    backward = {name: merge(DareLinear, params, chunks[name]) for name in ["b", "a"]}
    for name in "ab":
        assert torch.equal(forward[name], backward[name])
    c = chunks["a"]
    g1_first = torch.rand(5, generator=c.generator(1))
    c.generator(0)
    assert torch.equal(torch.rand(5, generator=c.generator(1)), g1_first)
    assert not torch.equal(torch.rand(5, generator=c.generator(0)), g1_first)


# ------------------------------------------------------------------------------------------------------ SLERP

def slerp_merge(make_source, base, model, params, name="w"):
    source = make_source(name, base, [model])
    p = Slerp.Params.model_validate(params)
    state = Slerp().tensor_state(p, source, None)
    return torch.cat([Slerp().merge(p, c, state) for c in source.chunks()]), state


def test_slerp_endpoints_are_exact(make_source):
    base = t([[0.3, -1.7], [2.5, 0.1]])
    model = t([[1.1, 0.4], [-0.6, 3.3]])
    out0, _ = slerp_merge(make_source, base, model, {"t": 0.0})
    assert torch.equal(out0, base)
    out1, _ = slerp_merge(make_source, base, model, {"t": 1.0})
    assert torch.equal(out1, model)


def test_slerp_orthogonal_midpoint(make_source):
    # base . model = 0 -> Omega = pi/2; t = 0.5: both coefficients sin(pi/4) / sin(pi/2) = 0.70710678
    base = t([3.0, 0.0, 4.0, 0.0])
    model = t([0.0, 2.0, 0.0, 0.0])
    out, state = slerp_merge(make_source, base, model, {"t": 0.5})
    assert state == pytest.approx((0.7071067811865476, 0.7071067811865476), rel=1e-12)
    torch.testing.assert_close(out, t([3.0 * 0.70710678, 2.0 * 0.70710678, 4.0 * 0.70710678, 0.0]))


def test_slerp_orthogonal_quarter(make_source):
    # t = 0.25: sin(3 pi / 8) = 0.92387953, sin(pi / 8) = 0.38268343
    base = t([3.0, 0.0, 4.0, 0.0])
    model = t([0.0, 2.0, 0.0, 0.0])
    out, state = slerp_merge(make_source, base, model, {"t": 0.25})
    assert state == pytest.approx((0.9238795325, 0.3826834324), rel=1e-9)
    torch.testing.assert_close(out, t([3.0 * 0.92387953, 2.0 * 0.38268343, 4.0 * 0.92387953, 0.0]))


def test_slerp_45_degrees(make_source):
    # base [1, 0], model [1, 1]: cos = 1/sqrt(2), Omega = pi/4; t = 0.5: sin(pi/8)/sin(pi/4) = 0.5411961
    out, _ = slerp_merge(make_source, t([1.0, 0.0]), t([1.0, 1.0]), {"t": 0.5})
    torch.testing.assert_close(out, t([2 * 0.54119610, 0.54119610]))


def test_slerp_angle_is_over_the_whole_tensor_not_per_chunk(make_source, monkeypatch):
    # Row by row the angles are 45 and 135 degrees; over the whole tensor base . model = 1 - 1 = 0.
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 2)
    base = t([[1.0, 1.0], [1.0, -1.0]])
    model = t([[1.0, 0.0], [-1.0, 0.0]])
    out, state = slerp_merge(make_source, base, model, {"t": 0.5})
    assert state == pytest.approx((0.7071067811865476, 0.7071067811865476), rel=1e-12)
    torch.testing.assert_close(out, t([[2 * 0.70710678, 0.70710678], [0.0, -0.70710678]]))


def test_slerp_collinear_falls_back_to_linear(make_source):
    base = t([1.0, 2.0, -2.0])
    out, state = slerp_merge(make_source, base, t([2.0, 4.0, -4.0]), {"t": 0.3})
    assert state == pytest.approx((0.7, 0.3))
    torch.testing.assert_close(out, t([1.3, 2.6, -2.6]))  # 0.7 * base + 0.3 * 2 * base
    # anti-parallel: |cos| = 1, also linear: the midpoint of x and -x is 0
    out_anti, state_anti = slerp_merge(make_source, base, t([-1.0, -2.0, 2.0]), {"t": 0.5})
    assert state_anti == pytest.approx((0.5, 0.5))
    torch.testing.assert_close(out_anti, t([0.0, 0.0, 0.0]))


def test_slerp_dot_threshold_decides_the_fallback(make_source):
    # base [1, 0], model [1, 1]: |cos| = 0.7071 > 0.7 -> linear
    out, state = slerp_merge(make_source, t([1.0, 0.0]), t([1.0, 1.0]), {"t": 0.5, "dot_threshold": 0.7})
    assert state == pytest.approx((0.5, 0.5))
    torch.testing.assert_close(out, t([1.0, 0.5]))


def test_slerp_takes_exactly_one_model():
    assert (Slerp.min_models, Slerp.max_models) == (1, 1)


def test_every_method_returns_float32_of_the_chunk_shape():
    c = chunk(torch.ones(3, 4), [torch.full((3, 4), 2.0), torch.full((3, 4), 3.0)])
    for name, cls in all_methods().items():
        if cls.uses_data:
            continue  # adaptive methods merge with what they learned: tests/test_adaptive.py
        if name == "slerp":
            c1 = chunk(torch.ones(3, 4), [torch.full((3, 4), 2.0)])
            out = cls().merge(cls.Params.model_validate({}), c1, (0.5, 0.5))
        else:
            out = cls().merge(cls.Params.model_validate({}), c, [Cut(0.0)] * 2)
        assert out.shape == (3, 4) and out.dtype == torch.float32, name
        assert bool(torch.isfinite(out).all()), name
