"""Unlabeled task inputs for adaptive methods, read and checked in full before any optimisation starts.

Two formats: JSONL with a `text` field per line (tokenised with the task checkpoint's tokenizer), or a safetensors
file of model inputs (`input_ids` with optional `attention_mask`/`token_type_ids`, or `pixel_values`). A safetensors
file is never loaded whole: its header is checked, the values are checked in passes of a few MiB, and each batch
reads its rows, so a test set of images larger than the worker's memory is fine. Pickles are refused like
everywhere else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from workers.engine.checkpoint import TORCH_DTYPES
from workers.engine.errors import EngineError, ErrorCode
from workers.engine.files import is_pickle, unsafe
from workers.engine.safetensors_format import TensorInfo, read_header_file

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_KEYS = ("pixel_values",)
MAX_BAD_LINES = 5
SCAN_BYTES = 16 << 20  # per read of the checks that look at every value


def _bad(path: Path, task: str, message: str, **detail: Any) -> EngineError:
    return EngineError(ErrorCode.INVALID_DATA, f"data of task {task!r} ({path.name}): {message}",
                       {"task": task, "path": str(path), **detail})


class StoredRows:
    """One input tensor of a safetensors file, [samples, ...], read a few rows at a time with positional reads."""

    def __init__(self, path: Path, info: TensorInfo):
        self.path, self.info = path, info
        self.dtype = TORCH_DTYPES[info.dtype]
        self.row_shape = info.shape[1:]
        self.row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0

    def __len__(self) -> int:
        return self.info.shape[0] if self.info.shape else 0

    def rows(self, index: list[int]) -> torch.Tensor:
        out = bytearray(len(index) * self.row_bytes)
        with self.path.open("rb") as f:
            for i, row in enumerate(index):
                out[i * self.row_bytes:(i + 1) * self.row_bytes] = os.pread(
                    f.fileno(), self.row_bytes, self.info.start + row * self.row_bytes)
        return self._tensor(out, len(index))

    def passes(self) -> Iterator[torch.Tensor]:
        """Every row, in consecutive blocks of about SCAN_BYTES, for the checks that look at every value."""
        step = max(1, SCAN_BYTES // max(self.row_bytes, 1))
        with self.path.open("rb") as f:
            for first in range(0, len(self), step):
                n = min(step, len(self) - first)
                block = os.pread(f.fileno(), n * self.row_bytes, self.info.start + first * self.row_bytes)
                yield self._tensor(bytearray(block), n)

    def _tensor(self, raw: bytearray, n: int) -> torch.Tensor:
        if not raw:
            return torch.empty((n, *self.row_shape), dtype=self.dtype)
        return torch.frombuffer(raw, dtype=self.dtype).view(n, *self.row_shape)


@dataclass
class TaskData:
    """Every input of one task: tokenised text in memory, or rows of a safetensors file read per batch; `batch`
    pads text to the longest sample in the batch."""

    task: str
    stored: dict[str, StoredRows] | None = None     # safetensors inputs, first dim = sample
    token_ids: list[list[int]] | None = None         # tokenised JSONL
    pad_id: int = 0

    def __len__(self) -> int:
        if self.stored is not None:
            return len(next(iter(self.stored.values())))
        assert self.token_ids is not None
        return len(self.token_ids)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stored is not None:
            rows = index.tolist()
            return {k: v.rows(rows).long() if k in TOKEN_KEYS else v.rows(rows).float() for k, v in self.stored.items()}
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
    try:
        header = read_header_file(path)
    except EngineError as exc:
        raise _bad(path, task, f"not a readable safetensors file ({exc.message})") from None
    known = {*TOKEN_KEYS, *IMAGE_KEYS}
    unknown = sorted(set(header.tensors) - known)
    if unknown:
        raise _bad(path, task, f"unknown input(s) {', '.join(unknown)}; expected input_ids (with optional "
                   "attention_mask, token_type_ids) or pixel_values", unknown=unknown)
    if not header.tensors:
        raise _bad(path, task, "the file holds no tensors")
    not_taken = sorted(set(header.tensors) - accepted)
    if not_taken:
        raise _bad(path, task, f"the model does not take {', '.join(not_taken)}; it takes "
                   f"{', '.join(sorted(accepted & known))}")
    stored = {k: StoredRows(path, info) for k, info in header.tensors.items()}
    counts = {k: (v.info.shape[0] if v.info.shape else 0) for k, v in stored.items()}
    n = next(iter(counts.values()))
    if n == 0 or any(c != n for c in counts.values()):
        raise _bad(path, task, f"inputs need the same, non-zero number of samples (first dimension): {counts}")
    if "pixel_values" in stored:
        _check_pixels(path, task, stored["pixel_values"], config)
    elif "input_ids" in stored:
        _check_tokens(path, task, stored, config)
    else:
        raise _bad(path, task, "needs input_ids or pixel_values")
    return TaskData(task, stored=stored)


def _check_tokens(path: Path, task: str, stored: dict[str, StoredRows], config: Any) -> None:
    ids = stored["input_ids"]
    shape = list(ids.info.shape)
    if len(shape) != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise _bad(path, task, f"input_ids must be a 2-D integer tensor [samples, tokens], got {ids.dtype} {shape}")
    for key in ("attention_mask", "token_type_ids"):
        if key in stored and (list(stored[key].info.shape) != shape or stored[key].dtype.is_floating_point):
            raise _bad(path, task, f"{key} must be an integer tensor shaped like input_ids {shape}, got "
                       f"{stored[key].dtype} {list(stored[key].info.shape)}")
    vocab = getattr(config, "vocab_size", None)
    if vocab and shape[1]:
        low, high = None, None
        for block in ids.passes():
            b_low, b_high = (int(v) for v in torch.aminmax(block))
            low, high = b_low if low is None else min(low, b_low), b_high if high is None else max(high, b_high)
        if low < 0 or high >= vocab:
            raise _bad(path, task, f"input_ids range over [{low}, {high}], outside the model's vocabulary "
                       f"[0, {vocab})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and shape[1] > limit:
        raise _bad(path, task, f"sequences of {shape[1]} tokens exceed the model's {limit} positions")


def _check_pixels(path: Path, task: str, pixels: StoredRows, config: Any) -> None:
    vision = getattr(config, "vision_config", None) or config
    size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
    if isinstance(size, (list, tuple)):
        size = tuple(size)
    elif size is not None:
        size = (size, size)
    shape = list(pixels.info.shape)
    if len(shape) != 4 or not pixels.dtype.is_floating_point:
        raise _bad(path, task, f"pixel_values must be a 4-D float tensor [samples, channels, height, width], got "
                   f"{pixels.dtype} {shape}")
    if shape[1] != channels or (size is not None and tuple(shape[2:]) != size):
        expected = [channels, *size] if size else [channels]
        raise _bad(path, task, f"pixel_values are {shape[1:]} per sample; the model expects {expected}")
    if not all(bool(torch.isfinite(block).all()) for block in pixels.passes()):
        raise _bad(path, task, "pixel_values hold NaN or Inf")
