"""Seeded, class-balanced sampling and the JSONL files the benchmark reads."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class Example(NamedTuple):
    text: str
    label: int


def unambiguous(by_label: Sequence[Iterable[str]], exclude: Iterable[str] = ()) -> list[list[str]]:
    """Each class's distinct non-empty texts, minus texts found under two labels or in `exclude` (so no test text
    is also a training text, and no text teaches two answers). Order is kept: sampling later is seeded."""
    seen: dict[str, set[int]] = {}
    for label, texts in enumerate(by_label):
        for text in texts:
            seen.setdefault(text, set()).add(label)
    dropped = set(exclude)
    return [[t for t in dict.fromkeys(texts) if t and len(seen[t]) == 1 and t not in dropped] for texts in by_label]


def shuffled(items: Iterable[T], seed: int) -> list[T]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def draw(by_label: Sequence[Sequence[str]], per_class: Sequence[int], seed: int) -> list[Example]:
    """`per_class[k]` random texts of class k, all classes mixed in random order."""
    picked = [Example(t, k) for k, texts in enumerate(by_label) for t in shuffled(texts, seed + k)[: per_class[k]]]
    return shuffled(picked, seed)


def split(by_label: Sequence[Sequence[str]], *, train: int, test: int, balance: bool, seed: int
          ) -> tuple[list[Example], list[Example]]:
    """Disjoint train and test sets of at most `train` and `test` examples, as even across classes as the data
    allows. Each class gives at most a quarter of its texts to test; with `balance` every class gives as many
    as the smallest one can."""
    k = len(by_label)
    sizes = [len(texts) for texts in by_label]
    if balance:
        sizes = [min(sizes)] * k
    n_test = [min(test // k, n // 4) for n in sizes]
    n_train = [min(train // k, n - t) for n, t in zip(sizes, n_test, strict=True)]
    pools = [shuffled(texts, seed + label) for label, texts in enumerate(by_label)]
    test_set = draw([p[:t] for p, t in zip(pools, n_test, strict=True)], n_test, seed + 1000)
    train_set = draw([p[t:] for p, t in zip(pools, n_test, strict=True)], n_train, seed + 2000)
    return train_set, test_set


def balanced(by_label: Sequence[Sequence[str]], total: int, seed: int) -> list[Example]:
    """At most `total` examples, the same number from each class (for evaluation-only sets)."""
    n = min(total // len(by_label), *map(len, by_label))
    return draw(by_label, [n] * len(by_label), seed)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
