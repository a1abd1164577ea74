"""Accuracy on a JSONL set of an expert, of a merged model for one task, or of the base body with an expert's head.

A merge writes one shared body in the base's names (`embeddings.*`, `encoder.*`, `pooler.*`) plus, per task,
`heads/<task>.safetensors` in the expert's names (`classifier.*`, and with some methods `bert.*` tensors that
replace the shared ones for that task). To score a task, the expert's classifier class is rebuilt from its config,
given the body under the `bert.` prefix, then the head file; every parameter must come from a file, so a tensor
the merge forgot fails loudly instead of running with random weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

from .splits import read_jsonl

BODY_PREFIX = "bert."
THREADS = 2


def body_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: the shards an index names, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return [single]


def read_tensors(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def compose(expert_dir: Path, body: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor]
            ) -> BertForSequenceClassification:
    """The expert's architecture with `body` (base names) then `overrides` (expert names, winning), all strict."""
    model = BertForSequenceClassification(AutoConfig.from_pretrained(expert_dir))
    state = {BODY_PREFIX + name: tensor for name, tensor in body.items()}
    state.update(overrides)
    model.load_state_dict(state, strict=True)  # raises on missing, unexpected or mis-shaped tensors
    return model.eval()


def load_expert(expert_dir: Path) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(expert_dir).eval()


def load_merged(merged_dir: Path, task: str, expert_dir: Path) -> BertForSequenceClassification:
    """The merged body with `heads/<task>.safetensors` on top; the expert folder gives only the config."""
    head = merged_dir / "heads" / f"{task}.safetensors"
    if not head.is_file():
        raise FileNotFoundError(f"{merged_dir} has no head for task {task!r} ({head})")
    return compose(expert_dir, read_tensors(body_files(merged_dir)), load_file(head))


def load_base_with_head(base_dir: Path, expert_dir: Path) -> BertForSequenceClassification:
    """The untouched base body with the expert's classifier: what a merge has to improve on."""
    expert = read_tensors(body_files(expert_dir))
    head = {name: tensor for name, tensor in expert.items() if not name.startswith(BODY_PREFIX)}
    return compose(expert_dir, read_tensors(body_files(base_dir)), head)


@torch.no_grad()
def predict(model: BertForSequenceClassification, tokenizer_dir: Path, texts: Sequence[str], *,
            batch_size: int = 64, max_length: int = 128) -> list[int]:
    """Predicted label ids, in the order of `texts`. Batches group texts of similar length to pad less."""
    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    predictions = [0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        for i, label in zip(batch, logits.argmax(-1).tolist(), strict=True):
            predictions[i] = label
    return predictions


def accuracy(model: BertForSequenceClassification, tokenizer_dir: Path, jsonl: Path) -> float:
    """Share of `{"text", "label"}` rows of `jsonl` predicted right."""
    rows = read_jsonl(jsonl)
    predicted = predict(model, tokenizer_dir, [r["text"] for r in rows])
    return sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def expert_accuracy(expert_dir: Path, jsonl: Path) -> float:
    return accuracy(load_expert(expert_dir), expert_dir, jsonl)


def merged_accuracy(merged_dir: Path, task: str, expert_dir: Path, jsonl: Path) -> float:
    return accuracy(load_merged(merged_dir, task, expert_dir), expert_dir, jsonl)


def base_with_head_accuracy(base_dir: Path, expert_dir: Path, jsonl: Path) -> float:
    return accuracy(load_base_with_head(base_dir, expert_dir), expert_dir, jsonl)
