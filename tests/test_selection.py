"""Exact k-th largest magnitudes, in one tensor and streamed, against a plain sort in the test."""

from __future__ import annotations

import pytest
import torch
from conftest import write_safetensors

from workers.engine import tensors as tensors_module
from workers.engine.checkpoint import Checkpoint
from workers.engine.selection import StreamingKthLargest, global_thresholds, keep_count, kth_largest
from workers.engine.tensors import TensorSource


def sorted_kth(values: torch.Tensor, k: int) -> float:
    """The k-th largest (1-based) by a full descending sort."""
    return float(values.reshape(-1).sort(descending=True).values[k - 1])


def magnitudes_with_hard_cases(seed: int) -> list[torch.Tensor]:
    """Several tensors: wide dynamic range, exact duplicates, zeros, subnormals, and a crowd of values that
    share their high 16 bits (so the second pass must separate them by the low bits)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(3000, generator=g).abs() * torch.exp(torch.randn(3000, generator=g) * 6)
    dupes = torch.randint(0, 5, (1500,), generator=g).float() * 0.5  # {0, 0.5, 1, 1.5, 2}
    crowd = 1.0 + torch.randint(0, 1 << 7, (700,), generator=g).float() * 2.0 ** -22  # one hi bucket
    zeros = torch.zeros(256)
    tiny = torch.rand(50, generator=g) * 1e-39  # subnormal float32
    return [wide, dupes.reshape(30, 50), crowd, zeros, tiny]


def stream(tensors: list[torch.Tensor], counts: list[int]) -> list[float]:
    selector = StreamingKthLargest(counts)
    for x in tensors:
        selector.first_pass(x)
    selector.end_first_pass()
    if selector.needs_second_pass():
        for x in tensors:
            selector.second_pass(x)
    return selector.thresholds()


# ------------------------------------------------------------------------------------------------ keep_count

@pytest.mark.parametrize(("fraction", "numel", "expected"), [
    (1.0, 10, 10),     # all
    (1.5, 10, 10),     # above 1: all
    (0.0, 10, 0),      # none
    (-0.5, 10, 0),     # below 0: none
    (0.5, 0, 0),       # empty tensor
    (0.001, 10, 1),    # at least one of a non-empty tensor
    (0.5, 7, 3),       # floor(3.5)
    (0.25, 80, 20),
    (0.1, 30, 3),
    (0.75, 4, 3),
    (0.999, 1000, 999),
])
def test_keep_count(fraction, numel, expected):
    assert keep_count(fraction, numel) == expected


# ----------------------------------------------------------------------------------------------- kth_largest

def test_kth_largest_small_by_hand():
    x = torch.tensor([0.5, 3.0, 2.0, 2.0, 0.0, 7.0])
    # sorted: 7, 3, 2, 2, 0.5, 0
    assert kth_largest(x.clone(), 1) == 7.0
    assert kth_largest(x.clone(), 2) == 3.0
    assert kth_largest(x.clone(), 3) == 2.0
    assert kth_largest(x.clone(), 4) == 2.0
    assert kth_largest(x.clone(), 5) == 0.5
    assert kth_largest(x.clone(), 0) == float("inf")  # keeps nothing
    assert kth_largest(x.clone(), 6) == 0.0            # keeps everything
    assert kth_largest(x.clone(), 100) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_largest_matches_sort(seed):
    values = torch.cat([x.reshape(-1) for x in magnitudes_with_hard_cases(seed)])
    n = values.numel()
    for k in [1, 2, 3, 17, 255, n // 3, n // 2, n - 300, n - 256, n - 255, n - 1]:
        assert kth_largest(values.clone(), k) == sorted_kth(values, k), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_largest_k_equal_n_keeps_everything(seed):
    values = torch.cat([x.reshape(-1) for x in magnitudes_with_hard_cases(seed)])
    n = values.numel()
    threshold = kth_largest(values.clone(), n)
    assert int((values >= threshold).sum()) == n
    positive = values[values > 0]
    # without zeros the minimum is the n-th largest; any threshold in (0, min] keeps all as well
    threshold_pos = kth_largest(positive.clone(), positive.numel())
    assert int((positive >= threshold_pos).sum()) == positive.numel()


# -------------------------------------------------------------------------------------- StreamingKthLargest

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_streaming_matches_sort_for_many_k_at_once(seed):
    parts = magnitudes_with_hard_cases(seed)
    values = torch.cat([x.reshape(-1) for x in parts])
    n = values.numel()
    ks = [1, 2, 5, 100, 1000, n // 2, n - 400, n - 257, n - 256, n - 255, n - 1, 1 + seed * 7]
    got = stream(parts, ks)
    assert got == [sorted_kth(values, k) for k in ks]


def test_streaming_crowded_bucket_needs_the_second_pass():
    # 1 + j * 2^-22 for j < 128 share their high 16 bits: only the low bits tell them apart.
    crowd = 1.0 + torch.arange(128, dtype=torch.float32) * 2.0 ** -22
    parts = [crowd[torch.randperm(128, generator=torch.Generator().manual_seed(0))]]
    selector = StreamingKthLargest([1, 2, 64, 127])
    selector.first_pass(parts[0])
    selector.end_first_pass()
    assert selector.needs_second_pass()
    selector.second_pass(parts[0])
    assert selector.thresholds() == [1.0 + 127 * 2.0 ** -22, 1.0 + 126 * 2.0 ** -22, 1.0 + 64 * 2.0 ** -22,
                                     1.0 + 1 * 2.0 ** -22]


def test_streaming_by_hand_with_duplicates_and_zeros():
    parts = [torch.tensor([0.0, 2.0, 0.5]), torch.tensor([[2.0, 0.0], [8.0, 0.25]]), torch.tensor([2.0])]
    # all: 8, 2, 2, 2, 0.5, 0.25, 0, 0 (n = 8)
    assert stream(parts, [1, 2, 4, 5, 6, 7]) == [8.0, 2.0, 2.0, 0.5, 0.25, 0.0]


def test_streaming_edge_counts():
    parts = [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])]
    # k = 0 keeps nothing; k >= n keeps everything; k = 1 is the maximum
    assert stream(parts, [0, 4, 5, 1]) == [float("inf"), 0.0, 0.0, 4.0]
    selector = StreamingKthLargest([0, 4])
    for x in parts:
        selector.first_pass(x)
    selector.end_first_pass()
    assert not selector.needs_second_pass()
    assert selector.numel == 4


def test_streaming_all_zeros():
    parts = [torch.zeros(10), torch.zeros(3, 3)]
    assert stream(parts, [1, 5, 19]) == [0.0, 0.0, 0.0]


def test_streaming_agrees_with_kth_largest_on_one_tensor():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5000, generator=g).abs()
    x[::7] = x[3]  # many duplicates
    for k in [1, 10, 714, 715, 716, 2500, 4999]:
        assert stream([x], [k]) == [kth_largest(x.clone(), k)] == [sorted_kth(x, k)]


# --------------------------------------------------------------------------------------- global_thresholds

@pytest.fixture
def checkpoints(tmp_path):
    """Base and two task models with three shared tensors of different shapes."""
    g = torch.Generator().manual_seed(42)
    shapes = {"a.weight": (40, 25), "b.weight": (300,), "c.bias": (7, 3, 5)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tasks = []
    for k in range(2):
        delta = {n: torch.randn(s, generator=g) * (0.1 + k) for n, s in shapes.items()}
        delta["b.weight"][:50] = 0.0  # unchanged entries: |tau| = 0
        delta["a.weight"][0, :10] = 0.75  # duplicates
        tasks.append({n: base[n] + delta[n] for n in shapes})
    paths = [write_safetensors(tmp_path / "base.safetensors", base)]
    paths += [write_safetensors(tmp_path / f"task{k}.safetensors", m) for k, m in enumerate(tasks)]
    ckpts = [Checkpoint.open(str(p)) for p in paths]
    yield shapes, base, tasks, ckpts
    for c in ckpts:
        c.close()


def _sources(shapes, ckpts):
    base, *models = ckpts
    return [TensorSource(n, base, models, [n, n], [False, False], [1.0, 1.0], 0) for n in shapes]


@pytest.mark.parametrize("fractions", [[0.1, 0.1], [0.3, 0.02], [1.0, 0.5], [0.0001, 0.9999]])
def test_global_thresholds_equal_sorting_the_whole_task_vector(checkpoints, fractions):
    shapes, base, tasks, ckpts = checkpoints
    total = 40 * 25 + 300 + 7 * 3 * 5  # 1405
    ticks: list[int] = []
    got = global_thresholds(_sources(shapes, ckpts), fractions, ticks.append)
    expected = []
    for k, fraction in enumerate(fractions):
        tau = torch.cat([(tasks[k][n] - base[n]).reshape(-1) for n in shapes]).abs()
        assert tau.numel() == total
        keep = {0.1: 140, 0.3: 421, 0.02: 28, 1.0: total, 0.5: 702, 0.0001: 1, 0.9999: 1404}[fraction]
        expected.append(0.0 if keep == total else sorted_kth(tau, keep))
    assert got == expected
    # one sweep per pass over every shared element; a second pass unless every count is trivial
    passes = 2 if any(0 < f < 1 for f in fractions) else 1
    assert sum(ticks) == passes * total


def test_global_thresholds_across_many_chunks(checkpoints, monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 50)  # a.weight: 2 rows per chunk
    shapes, base, tasks, ckpts = checkpoints
    sources = _sources(shapes, ckpts)
    assert len(sources[0].row_ranges) == 20
    assert [len(s.row_ranges) for s in sources] == [20, 6, 3]  # c.bias: rows 3 + 3 + 1
    ticks: list[int] = []
    got = global_thresholds(sources, [0.2, 0.05], ticks.append)
    assert sum(ticks) == 2 * 1405
    tau0 = torch.cat([(tasks[0][n] - base[n]).reshape(-1) for n in shapes]).abs()
    tau1 = torch.cat([(tasks[1][n] - base[n]).reshape(-1) for n in shapes]).abs()
    assert got == [sorted_kth(tau0, 281), sorted_kth(tau1, 70)]  # int(0.2 * 1405), int(0.05 * 1405)


def test_global_thresholds_see_pruned_tasks_as_zero(checkpoints):
    shapes, base, tasks, ckpts = checkpoints
    sources = _sources(shapes, ckpts)
    for s in sources:
        if s.name == "a.weight":
            s.pruned = [True, False]
    got = global_thresholds(sources, [0.1, 0.1], lambda n: None)
    kept = [(tasks[0][n] - base[n]).reshape(-1) for n in ["b.weight", "c.bias"]]
    tau0 = torch.cat([torch.zeros(1000), *kept])
    tau1 = torch.cat([(tasks[1][n] - base[n]).reshape(-1) for n in shapes])
    assert got == [sorted_kth(tau0.abs(), 140), sorted_kth(tau1.abs(), 140)]
