"""A tiny BERT base and real experts fine-tuned on synthetic token tasks, with unlabeled inputs per task: enough
for adaptive merging to have something to learn, small enough to build in seconds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import tiny_bert_config
from safetensors.torch import save_file

VOCAB = 120
LENGTH = 12
# Task k: does the sequence hold one of its marker tokens? Markers are disjoint, so experts disagree.
MARKERS = [list(range(10 + 10 * k, 20 + 10 * k)) for k in range(3)]


@dataclass(frozen=True)
class AdaptiveFamily:
    base: Path
    tasks: list[Path]
    data: list[Path]       # unlabeled inputs: safetensors input_ids, the last task as JSONL text
    labelled: list[tuple[torch.Tensor, torch.Tensor]]  # held-out (input_ids, labels) per task


def _sample(task: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(50, VOCAB, (n, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    markers = torch.tensor(MARKERS[task])
    positions = torch.randint(1, LENGTH, (n,), generator=generator)
    chosen = markers[torch.randint(0, len(markers), (n,), generator=generator)]
    ids[labels == 1, positions[labels == 1]] = chosen[labels == 1]
    ids[:, 0] = 2  # a [CLS]-like first token
    return ids, labels


def build_adaptive_family(root: Path, n_tasks: int = 3, steps: int = 80, seed: int = 0) -> AdaptiveFamily:
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds barrier waits, ruinous on a shared machine
    config = tiny_bert_config(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertModel(config).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    (base_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                   *(f"tok{i}" for i in range(5, VOCAB))]) + "\n")
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "do_lower_case": True,
                                                                "tokenizer_class": "BertTokenizer"}))
    generator = torch.Generator().manual_seed(seed + 1)
    tasks, data, labelled = [], [], []
    for k in range(n_tasks):
        model = BertForSequenceClassification(tiny_bert_config(
            vocab_size=VOCAB, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        model.bert.load_state_dict(base.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            ids, labels = _sample(k, 32, generator)
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        task_dir = root / f"task{k}"
        model.save_pretrained(task_dir, safe_serialization=True)
        tasks.append(task_dir)
        ids, labels = _sample(k, 64, generator)
        if k == n_tasks - 1:
            path = root / f"data{k}.jsonl"
            path.write_text("".join(json.dumps({"text": " ".join(f"tok{int(t)}" for t in row[1:])}) + "\n"
                                    for row in ids))
        else:
            path = root / f"data{k}.safetensors"
            save_file({"input_ids": ids.contiguous(), "attention_mask": torch.ones_like(ids)}, str(path))
        data.append(path)
        labelled.append(_sample(k, 128, generator))
    return AdaptiveFamily(base_dir, tasks, data, labelled)
