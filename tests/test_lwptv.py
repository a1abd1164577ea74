"""LwPTV layer scores on checkpoints built so that every score is known by hand, and an end-to-end merge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_safetensors
from safetensors.torch import load_file

from workers.engine import lwptv
from workers.engine import tensors as tensors_module
from workers.engine.checkpoint import Checkpoint
from workers.engine.merge import LWPTV_FILE, run_merge
from workers.engine.spec import LwPTVConfig, MergeSpec
from workers.engine.tensors import TensorSource

# ----------------------------------------------------------------------------------------------------
# Saliency fixture: five tensors, 80 entries. With q = 0.25 each task's global top-q is its 20 largest |tau|.
# Every task changes exactly 20 entries by a large amount (|tau| >= 8) and all the others by tiny, nonzero,
# amounts (|tau| <= 20/1024), so the salient entries are exactly the large ones:
#   t1: all 10 of encoder.layer.0.attention.weight, 10 of the 20 of encoder.layer.1.weight
#   t2: 15 of the 20 of embeddings.weight, 5 of the 10 of encoder.layer.0.output.weight
# ----------------------------------------------------------------------------------------------------
EMB, ATT0, OUT0 = "embeddings.weight", "encoder.layer.0.attention.weight", "encoder.layer.0.output.weight"
L1, L2 = "encoder.layer.1.weight", "encoder.layer.2.weight"
SHAPES = {EMB: (4, 5), ATT0: (2, 5), OUT0: (2, 5), L1: (4, 5), L2: (4, 5)}
LARGE = {"t1": {ATT0: 10, L1: 10}, "t2": {EMB: 15, OUT0: 5}}


def _base(name: str) -> torch.Tensor:
    n = math.prod(SHAPES[name])
    # exact halves in [-0.5, 2.5]
    return ((torch.arange(n) % 7 - 3).float() * 0.5 + 1.0).reshape(SHAPES[name])


def _delta(name: str, n_large: int) -> torch.Tensor:
    """First n_large entries: +-(8 + j/8); the rest: +-(j+1)/1024. Exact in float32 when added to the base."""
    n = math.prod(SHAPES[name])
    j = torch.arange(n).float()
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    magnitude = torch.where(torch.arange(n) < n_large, 8.0 + j / 8.0, (j + 1.0) / 1024.0)
    return (sign * magnitude).reshape(SHAPES[name])


def _task(task: str) -> dict[str, torch.Tensor]:
    return {n: _base(n) + _delta(n, LARGE[task].get(n, 0)) for n in SHAPES}


@pytest.fixture
def family(tmp_path):
    base = write_safetensors(tmp_path / "base.safetensors", {n: _base(n) for n in SHAPES})
    tasks = [write_safetensors(tmp_path / f"{t}.safetensors", _task(t)) for t in ("t1", "t2")]
    return base, tasks


@pytest.fixture
def sources(family):
    base_path, task_paths = family
    base = Checkpoint.open(str(base_path))
    models = [Checkpoint.open(str(p)) for p in task_paths]
    yield [TensorSource(n, base, models, [n, n], [False, False], [1.0, 1.0], 0) for n in SHAPES]
    for c in (base, *models):
        c.close()


def test_fixture_deltas_are_exact():
    for task in ("t1", "t2"):
        model = _task(task)
        for n in SHAPES:
            tau = model[n] - _base(n)
            assert torch.equal(tau, _delta(n, LARGE[task].get(n, 0)))
            assert int((tau.abs() >= 8).sum()) == LARGE[task].get(n, 0)
            assert float(tau.abs().min()) > 0


def test_saliency_scores_per_tensor(sources):
    ticks: list[int] = []
    result = lwptv.compute(LwPTVConfig(q=0.25), sources, ["t1", "t2"], ticks.append)
    layers = {task: result.report["tasks"][task]["layers"] for task in ("t1", "t2")}
    # score = (salient entries of the layer / its entries) / q
    expected = {
        "t1": {EMB: 0.0, ATT0: (10 / 10) / 0.25, OUT0: 0.0, L1: (10 / 20) / 0.25, L2: 0.0},  # 0, 4, 0, 2, 0
        "t2": {EMB: (15 / 20) / 0.25, ATT0: 0.0, OUT0: (5 / 10) / 0.25, L1: 0.0, L2: 0.0},   # 3, 0, 2, 0, 0
    }
    assert expected["t1"][ATT0] == 4.0 and expected["t2"][EMB] == 3.0
    for task in ("t1", "t2"):
        assert set(layers[task]) == set(SHAPES)
        for n in SHAPES:
            assert layers[task][n]["score"] == pytest.approx(expected[task][n], abs=1e-12), (task, n)
            assert layers[task][n]["tensors"] == [n]
    # default eta 0.5: layers scoring below it are pruned for that task
    assert result.pruned == {EMB: [True, False], ATT0: [False, True], OUT0: [True, False], L1: [False, True],
                             L2: [True, True]}
    for task, kept in (("t1", {ATT0, L1}), ("t2", {EMB, OUT0})):
        assert {n for n in SHAPES if layers[task][n]["kept"]} == kept
        assert result.report["tasks"][task]["kept"] == 2
        assert result.report["tasks"][task]["pruned"] == 3
    assert result.report["paper"] == "arXiv 2506.09093"
    assert result.report["config"]["q"] == 0.25 and result.report["config"]["eta"] == 0.5
    # two passes for the exact global threshold, one to count per layer
    assert sum(ticks) == 3 * 80


def test_saliency_scores_average_one_weighted_by_size(sources):
    result = lwptv.compute(LwPTVConfig(q=0.25), sources, ["t1", "t2"], lambda n: None)
    for task in ("t1", "t2"):
        layers = result.report["tasks"][task]["layers"]
        mean = sum(layers[n]["score"] * math.prod(SHAPES[n]) for n in SHAPES) / 80
        assert mean == pytest.approx(1.0)


@pytest.mark.parametrize(("eta", "kept_t1", "kept_t2"), [
    (0.0, {EMB, ATT0, OUT0, L1, L2}, {EMB, ATT0, OUT0, L1, L2}),  # nothing scores below 0
    (2.0, {ATT0, L1}, {EMB, OUT0}),     # a score equal to eta (2.0) is kept
    (2.5, {ATT0}, {EMB}),
    (3.5, {ATT0}, set()),
    (4.5, set(), set()),
])
def test_eta_decides_pruning(sources, eta, kept_t1, kept_t2):
    result = lwptv.compute(LwPTVConfig(q=0.25, eta=eta), sources, ["t1", "t2"], lambda n: None)
    assert {n for n in SHAPES if not result.pruned[n][0]} == kept_t1
    assert {n for n in SHAPES if not result.pruned[n][1]} == kept_t2


def test_saliency_block_granularity_groups_encoder_layers(sources):
    result = lwptv.compute(LwPTVConfig(q=0.25, granularity="block"), sources, ["t1", "t2"], lambda n: None)
    blocks = {"embeddings.weight": [EMB], "encoder.layer.0": [ATT0, OUT0], "encoder.layer.1": [L1],
              "encoder.layer.2": [L2]}
    expected = {
        # encoder.layer.0 has 20 entries: t1 has 10 salient in it, t2 5
        "t1": {"embeddings.weight": 0.0, "encoder.layer.0": (10 / 20) / 0.25, "encoder.layer.1": 2.0,
               "encoder.layer.2": 0.0},
        "t2": {"embeddings.weight": 3.0, "encoder.layer.0": (5 / 20) / 0.25, "encoder.layer.1": 0.0,
               "encoder.layer.2": 0.0},
    }
    for task in ("t1", "t2"):
        layers = result.report["tasks"][task]["layers"]
        assert set(layers) == set(blocks)
        for block, members in blocks.items():
            assert layers[block]["tensors"] == members
            assert layers[block]["score"] == pytest.approx(expected[task][block], abs=1e-12)
    # layer.0 scores 2 for t1 and 1 for t2: both tensors kept for both tasks (eta 0.5)
    assert result.pruned[ATT0] == result.pruned[OUT0] == [False, False]
    assert result.pruned[EMB] == [True, False]
    assert result.pruned[L1] == [False, True]
    assert result.pruned[L2] == [True, True]
    assert result.report["tasks"]["t1"]["kept"] == 2 and result.report["tasks"]["t1"]["pruned"] == 2


def test_block_pattern_is_configurable(sources):
    config = LwPTVConfig(q=0.25, granularity="block", block_pattern=r"^(encoder)\.")
    result = lwptv.compute(config, sources, ["t1", "t2"], lambda n: None)
    layers = result.report["tasks"]["t1"]["layers"]
    assert set(layers) == {"embeddings.weight", "encoder"}
    # encoder: 60 entries, t1 has all its 20 salient entries there: (20/60)/0.25 = 4/3
    assert layers["encoder"]["score"] == pytest.approx(round(4 / 3, 6), abs=1e-12)
    t2_encoder = result.report["tasks"]["t2"]["layers"]["encoder"]["score"]
    assert t2_encoder == pytest.approx(round((5 / 60) / 0.25, 6))  # 1/3


def test_layer_of():
    tensor = LwPTVConfig()
    block = LwPTVConfig(granularity="block")
    assert lwptv.layer_of("encoder.layer.11.attention.self.query.weight", tensor) == (
        "encoder.layer.11.attention.self.query.weight")
    assert lwptv.layer_of("encoder.layer.11.attention.self.query.weight", block) == "encoder.layer.11"
    assert lwptv.layer_of("model.layers.3.mlp.up_proj.weight", block) == "model.layers.3"
    assert lwptv.layer_of("transformer.h.0.attn.c_attn.weight", block) == "transformer.h.0"
    assert lwptv.layer_of("vision.blocks.7.norm1.bias", block) == "vision.blocks.7"
    assert lwptv.layer_of("embeddings.word_embeddings.weight", block) == "embeddings.word_embeddings.weight"
    assert lwptv.layer_of("encoder.layer.norm.weight", block) == "encoder.layer.norm.weight"


# ---------------------------------------------------------------------------------------------- relative_norm
# encoder.layer.0.a.weight: base all 1 (||.|| = 2); t1 tau [[3, 4], [0, 0]] -> 5/2; t2 [[0, 0], [0, 1]] -> 1/2
# encoder.layer.0.b.weight: base all 2 (||.|| = 4); t1 tau [0.5, 0, 0, 0] -> 1/8;  t2 [2, 2, 2, 2] -> 4/4
# pooler.bias: base all 0 -> no relative norm (inf, reported as null, never pruned)
RN_BASE = {"encoder.layer.0.a.weight": torch.ones(2, 2), "encoder.layer.0.b.weight": torch.full((1, 4), 2.0),
           "pooler.bias": torch.zeros(3)}
RN_TAU = {
    "t1": {"encoder.layer.0.a.weight": [[3.0, 4.0], [0.0, 0.0]], "encoder.layer.0.b.weight": [[0.5, 0, 0, 0]],
           "pooler.bias": [1.0, 0.0, 0.0]},
    "t2": {"encoder.layer.0.a.weight": [[0.0, 0.0], [0.0, 1.0]], "encoder.layer.0.b.weight": [[2.0, 2, 2, 2]],
           "pooler.bias": [0.0, 0.0, 0.0]},
}


@pytest.fixture
def rn_sources(tmp_path):
    base_path = write_safetensors(tmp_path / "base.safetensors", RN_BASE)
    paths = [write_safetensors(tmp_path / f"{t}.safetensors",
                               {n: RN_BASE[n] + torch.tensor(RN_TAU[t][n]) for n in RN_BASE})
             for t in ("t1", "t2")]
    base = Checkpoint.open(str(base_path))
    models = [Checkpoint.open(str(p)) for p in paths]
    yield [TensorSource(n, base, models, [n, n], [False, False], [1.0, 1.0], 0) for n in RN_BASE]
    for c in (base, *models):
        c.close()


def test_relative_norm_scores(rn_sources):
    ticks: list[int] = []
    config = LwPTVConfig(score="relative_norm", eta=1.0)
    result = lwptv.compute(config, rn_sources, ["t1", "t2"], ticks.append)
    t1 = result.report["tasks"]["t1"]["layers"]
    t2 = result.report["tasks"]["t2"]["layers"]
    assert t1["encoder.layer.0.a.weight"]["score"] == 2.5
    assert t1["encoder.layer.0.b.weight"]["score"] == 0.125
    assert t2["encoder.layer.0.a.weight"]["score"] == 0.5
    assert t2["encoder.layer.0.b.weight"]["score"] == 1.0
    assert t1["pooler.bias"]["score"] is None and t2["pooler.bias"]["score"] is None
    assert result.pruned == {"encoder.layer.0.a.weight": [False, True],
                             "encoder.layer.0.b.weight": [True, False],
                             "pooler.bias": [False, False]}
    assert sum(ticks) == 4 + 4 + 3  # one pass
    json.dumps(result.report, allow_nan=False)  # JSON has no infinity


def test_relative_norm_block(rn_sources):
    config = LwPTVConfig(score="relative_norm", eta=1.0, granularity="block")
    result = lwptv.compute(config, rn_sources, ["t1", "t2"], lambda n: None)
    layer = "encoder.layer.0"
    # t1: sqrt(9 + 16 + 0.25) / sqrt(4 * 1 + 4 * 4) = sqrt(25.25 / 20);  t2: sqrt(1 + 16) / sqrt(20)
    t1 = result.report["tasks"]["t1"]["layers"][layer]["score"]
    t2 = result.report["tasks"]["t2"]["layers"][layer]["score"]
    assert t1 == pytest.approx(1.123610, abs=1e-6)
    assert t2 == pytest.approx(0.921954, abs=1e-6)
    assert result.pruned["encoder.layer.0.a.weight"] == [False, True]
    assert result.pruned["encoder.layer.0.b.weight"] == [False, True]


def test_scores_do_not_depend_on_chunking(family, monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 5)  # one row per chunk
    base_path, task_paths = family
    base = Checkpoint.open(str(base_path))
    models = [Checkpoint.open(str(p)) for p in task_paths]
    try:
        sources = [TensorSource(n, base, models, [n, n], [False, False], [1.0, 1.0], 0) for n in SHAPES]
        assert len(sources[0].row_ranges) == 4
        result = lwptv.compute(LwPTVConfig(q=0.25), sources, ["t1", "t2"], lambda n: None)
    finally:
        for c in (base, *models):
            c.close()
    layers = result.report["tasks"]["t1"]["layers"]
    assert [layers[n]["score"] for n in SHAPES] == [0.0, 4.0, 0.0, 2.0, 0.0]
    layers = result.report["tasks"]["t2"]["layers"]
    assert [layers[n]["score"] for n in SHAPES] == [3.0, 0.0, 2.0, 0.0, 0.0]



def test_unchanged_layers_are_never_salient(tmp_path):
    # t1 changes only the 10 entries of ATT0; q = 0.25 asks for the top 20 of 80 entries.
    base = {n: _base(n) for n in SHAPES}
    model = {n: _base(n) + (_delta(n, 10) if n == ATT0 else 0.0) for n in SHAPES}
    b = Checkpoint.open(str(write_safetensors(tmp_path / "base.safetensors", base)))
    m = Checkpoint.open(str(write_safetensors(tmp_path / "t1.safetensors", model)))
    try:
        sources = [TensorSource(n, b, [m], [n], [False], [1.0], 0) for n in SHAPES]
        result = lwptv.compute(LwPTVConfig(q=0.25), sources, ["t1"], lambda n: None)
    finally:
        b.close()
        m.close()
    layers = result.report["tasks"]["t1"]["layers"]
    # tau is exactly zero in four of the five layers: nothing of the fine-tune is there
    for n in (EMB, OUT0, L1, L2):
        assert layers[n]["score"] == 0.0, n
        assert result.pruned[n] == [True], n
    assert result.pruned[ATT0] == [False]


def test_progress_counts_every_element_with_uneven_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 2)  # pooler.bias (3,): rows [0, 2) and [2, 3)
    base_path = write_safetensors(tmp_path / "base.safetensors", RN_BASE)
    path = write_safetensors(tmp_path / "t1.safetensors",
                             {n: RN_BASE[n] + torch.tensor(RN_TAU["t1"][n]) for n in RN_BASE})
    base, model = Checkpoint.open(str(base_path)), Checkpoint.open(str(path))
    try:
        sources = [TensorSource(n, base, [model], [n], [False], [1.0], 0) for n in RN_BASE]
        assert [len(s.row_ranges) for s in sources] == [2, 1, 2]
        for config, passes in ((LwPTVConfig(score="relative_norm", eta=1.0), 1), (LwPTVConfig(q=0.5), 3)):
            ticks: list[int] = []
            lwptv.compute(config, sources, ["t1"], ticks.append)
            assert sum(ticks) == passes * (4 + 4 + 3), config.score
    finally:
        base.close()
        model.close()


# ----------------------------------------------------------------------------------------------- end to end

def test_merge_with_lwptv_keeps_the_base_where_every_task_is_pruned(family, tmp_path):
    base_path, (t1_path, t2_path) = family
    spec = MergeSpec.model_validate({
        "method": "task_arithmetic",
        "base_model": str(base_path),
        "models": [{"model": str(t1_path), "name": "t1"}, {"model": str(t2_path), "name": "t2"}],
        "parameters": {"lambda": 1.0},
        "lwptv": {"score": "saliency", "q": 0.25, "eta": 0.5},
    })
    out = tmp_path / "merged"
    run_merge(spec, out)
    merged = load_file(str(out / "model.safetensors"))
    t1, t2 = _task("t1"), _task("t2")
    assert set(merged) == set(SHAPES)
    assert all(v.dtype == torch.float32 for v in merged.values())
    # encoder.layer.2 is pruned for both tasks: exactly the base, not base + the tiny deltas
    assert torch.equal(merged[L2], _base(L2))
    assert not torch.equal(t1[L2], _base(L2)) and not torch.equal(t2[L2], _base(L2))
    # elsewhere one task is pruned, so with lambda 1 the merge is base + the other task's tau (exact here)
    assert torch.equal(merged[EMB], t2[EMB])
    assert torch.equal(merged[OUT0], t2[OUT0])
    assert torch.equal(merged[ATT0], t1[ATT0])
    assert torch.equal(merged[L1], t1[L1])

    report = json.loads((out / LWPTV_FILE).read_text())
    expected_scores = {"t1": {EMB: 0.0, ATT0: 4.0, OUT0: 0.0, L1: 2.0, L2: 0.0},
                       "t2": {EMB: 3.0, ATT0: 0.0, OUT0: 2.0, L1: 0.0, L2: 0.0}}
    assert set(report["tasks"]) == {"t1", "t2"}
    for task, scores in expected_scores.items():
        layers = report["tasks"][task]["layers"]
        assert set(layers) == set(SHAPES)
        for name, score in scores.items():
            assert layers[name]["score"] == pytest.approx(score, abs=1e-9)
            assert layers[name]["kept"] is (score >= 0.5)
        assert report["tasks"][task]["kept"] == 2 and report["tasks"][task]["pruned"] == 3
