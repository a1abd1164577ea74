"""Expert fine-tuning on CPU: a linear probe of the frozen base, then a short, small-lr full fine-tune.

Probing first (LP-FT, Kumar et al. 2022) means the full fine-tune starts from a useful head, so the body moves
less and in a task-relevant direction: the task vectors stay small, which is what weight merging relies on.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification, PreTrainedModel

from .splits import Example

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class Recipe:
    """Sized for 2 CPU cores: the six experts took 12 minutes on a busy shared machine (sentiment: 34 s idle)."""

    max_length: int = 128
    probe_steps: int = 300  # full-batch Adam on cached features: milliseconds each
    probe_lr: float = 1e-2
    lr: float = 3e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_steps: int = 125  # one epoch of 2,000 examples
    threads: int = 2


def save_model(model: PreTrainedModel, tokenizer_source: Path, folder: Path) -> None:
    """save_pretrained (safetensors: transformers 5 writes nothing else) plus the base's tokenizer files, copied
    byte for byte. Weights are made world-readable: transformers writes them 0600, which a service running as
    another user could not read."""
    model.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.chmod(0o644)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_source / name, folder / name)


def _pad(tokenizer, ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({"input_ids": list(ids)}, return_tensors="pt")


@torch.no_grad()
def _pooled_features(model: BertForSequenceClassification, tokenizer, ids: list[list[int]]) -> torch.Tensor:
    """The pooler outputs the classifier sees, computed once for the probe (eval mode: no dropout)."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    features = torch.empty(len(ids), model.config.hidden_size)
    for start in range(0, len(order), 64):
        batch = order[start : start + 64]
        inputs = _pad(tokenizer, [ids[i] for i in batch])
        output = model.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        features[batch] = output.pooler_output
    return features


def _probe(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor, recipe: Recipe) -> float:
    """Fit the head alone (multinomial logistic regression); returns its training accuracy."""
    optimizer = torch.optim.Adam(classifier.parameters(), lr=recipe.probe_lr)
    for _ in range(recipe.probe_steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        return (classifier(features).argmax(-1) == labels).float().mean().item()


def _length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Random batches of examples of similar length, so little compute goes to padding: shuffle, sort each window
    of 32 batches by length, cut it into batches, shuffle the batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 32 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _full_finetune(model: BertForSequenceClassification, tokenizer, ids: list[list[int]], labels: torch.Tensor,
                   recipe: Recipe, seed: int) -> int:
    """At most one epoch of AdamW with linearly decaying lr; returns the number of steps."""
    model.train()
    batches = _length_grouped_batches([len(x) for x in ids], recipe.batch_size, seed)[: recipe.max_steps]
    # fused: same update, one kernel instead of ~100 per step; a third of a short-sequence step otherwise.
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches))
    for batch in batches:
        inputs = _pad(tokenizer, [ids[i] for i in batch])
        loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return len(batches)


def train_expert(base_dir: Path, labels: list[str], train: list[Example], out_dir: Path, seed: int,
                 recipe: Recipe = Recipe()) -> dict:
    """Fine-tune the base on `train` and save a `from_pretrained`-loadable folder; returns what happened."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)})
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer([e.text for e in train], truncation=True, max_length=recipe.max_length)["input_ids"]
    targets = torch.tensor([e.label for e in train])

    start = time.perf_counter()
    probe_accuracy = _probe(model.classifier, _pooled_features(model, tokenizer, ids), targets, recipe)
    probe_seconds = time.perf_counter() - start
    steps = _full_finetune(model, tokenizer, ids, targets, recipe, seed)
    seconds = time.perf_counter() - start

    save_model(model, base_dir, out_dir)
    return {"seed": seed, "train_examples": len(train), "probe_train_accuracy": round(probe_accuracy, 4),
            "probe_seconds": round(probe_seconds, 1), "finetune_steps": steps, "seconds": round(seconds, 1),
            "recipe": asdict(recipe)}
