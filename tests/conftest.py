"""Shared fixtures: tiny real Hugging Face models built from a config, saved as safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Family:
    base: Path
    tasks: list[Path]


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    fields = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    fields.update(overrides)
    return BertConfig(**fields)


def build_bert_family(root: Path, n_tasks: int = 3, noise: float = 0.02, seed: int = 0) -> Family:
    """A bare BertModel base and BertForSequenceClassification fine-tunes of it (prefix `bert.`, own heads)."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = tiny_bert_config()
    base = BertModel(config, add_pooling_layer=True).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (base_dir / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(config.vocab_size)) + "\n")
    tasks = []
    for k in range(n_tasks):
        model = BertForSequenceClassification(tiny_bert_config(num_labels=2 + k)).eval()
        model.bert.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed * 100 + k + 1)
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise)
        task_dir = root / f"task{k}"
        model.save_pretrained(task_dir, safe_serialization=True)
        tasks.append(task_dir)
    return Family(base_dir, tasks)


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> Family:
    return build_bert_family(tmp_path_factory.mktemp("bert"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from servers import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service(tmp_path_factory, s3_server):
    """Redis, the API and a Celery worker, shared by the tests that leave them running as they found them."""
    from servers import running_service

    with running_service(tmp_path_factory.mktemp("service"), s3_server) as svc:
        yield svc


@pytest.fixture(scope="session")
def stored_family(tmp_path_factory, s3_server) -> dict[str, str]:
    """The tiny BERT family uploaded to S3: name -> s3:// URI."""
    family = build_bert_family(tmp_path_factory.mktemp("stored-bert"))
    uris = {"base": s3_server.upload_folder(family.base, "models/base")}
    for i, task in enumerate(family.tasks):
        uris[f"task{i}"] = s3_server.upload_folder(task, f"models/task{i}")
    return uris
