"""Unlabeled task inputs for adaptive methods, read and checked in full before any optimisation starts.

Two formats: JSONL with a `text` field per line (tokenised with the task checkpoint's tokenizer), or a safetensors
file of model inputs (`input_ids` with optional `attention_mask`/`token_type_ids`, or `pixel_values`). Safetensors
is read with the safe loader; pickles are refused like everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import EngineError, ErrorCode
from workers.engine.files import is_pickle, unsafe

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_KEYS = ("pixel_values",)
MAX_BAD_LINES = 5


def _bad(path: Path, task: str, message: str, **detail: Any) -> EngineError:
    return EngineError(ErrorCode.INVALID_DATA, f"data of task {task!r} ({path.name}): {message}",
                       {"task": task, "path": str(path), **detail})


@dataclass
class TaskData:
    """Every input of one task, on the CPU; `batch` pads text to the longest sample in the batch."""

    task: str
    tensors: dict[str, torch.Tensor] | None = None   # safetensors inputs, first dim = sample
    token_ids: list[list[int]] | None = None         # tokenised JSONL
    pad_id: int = 0

    def __len__(self) -> int:
        if self.tensors is not None:
            return next(iter(self.tensors.values())).shape[0]
        assert self.token_ids is not None
        return len(self.token_ids)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            return {k: v.index_select(0, index) for k, v in self.tensors.items()}
        assert self.token_ids is not None
        rows = [self.token_ids[i] for i in index.tolist()]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_task_data(path: Path, task: str, config: Any, accepted: set[str], tokenizer_folder: Path | None,
                   max_length: int) -> TaskData:
    """Read and check one task's inputs against its model: `config` is its transformers config, `accepted` the
    input names its forward takes."""
    if not path.is_file():
        raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"data of task {task!r}: {path} is not a file",
                          {"task": task, "path": str(path)})
    if is_pickle(path.name):
        raise unsafe(str(path))
    if path.stat().st_size == 0:
        raise _bad(path, task, "the file is empty")
    if path.suffix == ".safetensors":
        return _tensor_data(path, task, config, accepted)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        if "input_ids" not in accepted:
            raise _bad(path, task, "text inputs (JSONL) need a model that takes input_ids; this one takes "
                       f"{', '.join(sorted(accepted & {*TOKEN_KEYS, *IMAGE_KEYS})) or 'neither'}")
        return _text_data(path, task, config, tokenizer_folder, max_length)
    raise _bad(path, task, "unknown format; give JSONL (.jsonl) with a `text` field per line, or a .safetensors "
               "file of model inputs")


def _text_data(path: Path, task: str, config: Any, tokenizer_folder: Path | None, max_length: int) -> TaskData:
    texts, bad = [], []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad.append(f"line {number}: not JSON ({exc.msg})")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                    bad.append(f"line {number}: needs a non-empty string field `text`")
                    continue
                texts.append(row["text"])
        except UnicodeDecodeError as exc:
            raise _bad(path, task, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if bad:
        raise _bad(path, task, f"{len(bad)} bad line(s): " + "; ".join(bad[:MAX_BAD_LINES]), bad_lines=len(bad))
    if not texts:
        raise _bad(path, task, "no samples: every line is blank")
    tokenizer = _tokenizer(tokenizer_folder, task)
    limit = min(max_length, getattr(config, "max_position_embeddings", max_length))
    ids = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    return TaskData(task, token_ids=ids, pad_id=tokenizer.pad_token_id or 0)


@lru_cache(maxsize=8)
def _cached_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _tokenizer(folder: Path | None, task: str) -> Any:
    try:
        if folder is None:
            raise OSError("no checkpoint folder")
        return _cached_tokenizer(str(folder))
    except (OSError, ValueError) as exc:
        raise EngineError(ErrorCode.INVALID_DATA, f"task {task!r} has text inputs but no tokenizer: put the "
                          "tokenizer files in the task's (or the base's) checkpoint folder, or give "
                          f"pre-tokenised input_ids in a .safetensors file ({exc})", {"task": task}) from None


def _tensor_data(path: Path, task: str, config: Any, accepted: set[str]) -> TaskData:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _bad(path, task, f"not a readable safetensors file ({exc})") from None
    known = {*TOKEN_KEYS, *IMAGE_KEYS}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise _bad(path, task, f"unknown input(s) {', '.join(unknown)}; expected input_ids (with optional "
                   "attention_mask, token_type_ids) or pixel_values", unknown=unknown)
    if not tensors:
        raise _bad(path, task, "the file holds no tensors")
    not_taken = sorted(set(tensors) - accepted)
    if not_taken:
        raise _bad(path, task, f"the model does not take {', '.join(not_taken)}; it takes "
                   f"{', '.join(sorted(accepted & known))}")
    counts = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    n = next(iter(counts.values()))
    if n == 0 or any(c != n for c in counts.values()):
        raise _bad(path, task, f"inputs need the same, non-zero number of samples (first dimension): {counts}")
    if "pixel_values" in tensors:
        _check_pixels(path, task, tensors["pixel_values"], config)
    elif "input_ids" in tensors:
        _check_tokens(path, task, tensors, config)
    else:
        raise _bad(path, task, "needs input_ids or pixel_values")
    return TaskData(task, tensors={k: (v.long() if k in TOKEN_KEYS else v.float()) for k, v in tensors.items()})


def _check_tokens(path: Path, task: str, tensors: dict[str, torch.Tensor], config: Any) -> None:
    ids = tensors["input_ids"]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise _bad(path, task, f"input_ids must be a 2-D integer tensor [samples, tokens], got {ids.dtype} "
                   f"{list(ids.shape)}")
    for key in ("attention_mask", "token_type_ids"):
        if key in tensors and (tensors[key].shape != ids.shape or tensors[key].is_floating_point()):
            raise _bad(path, task, f"{key} must be an integer tensor shaped like input_ids {list(ids.shape)}, got "
                       f"{tensors[key].dtype} {list(tensors[key].shape)}")
    vocab = getattr(config, "vocab_size", None)
    if ids.numel() and vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise _bad(path, task, f"input_ids range over [{int(ids.min())}, {int(ids.max())}], outside the model's "
                   f"vocabulary [0, {vocab})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        raise _bad(path, task, f"sequences of {ids.shape[1]} tokens exceed the model's {limit} positions")


def _check_pixels(path: Path, task: str, pixels: torch.Tensor, config: Any) -> None:
    vision = getattr(config, "vision_config", None) or config
    size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
    if isinstance(size, (list, tuple)):
        size = tuple(size)
    elif size is not None:
        size = (size, size)
    if pixels.dim() != 4 or not pixels.is_floating_point():
        raise _bad(path, task, f"pixel_values must be a 4-D float tensor [samples, channels, height, width], got "
                   f"{pixels.dtype} {list(pixels.shape)}")
    if pixels.shape[1] != channels or (size is not None and tuple(pixels.shape[2:]) != size):
        expected = [channels, *size] if size else [channels]
        raise _bad(path, task, f"pixel_values are {list(pixels.shape[1:])} per sample; the model expects "
                   f"{expected}")
    low, high = torch.aminmax(pixels)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise _bad(path, task, "pixel_values hold NaN or Inf")
