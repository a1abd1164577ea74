"""Reads a stored checkpoint's description from object storage without downloading it: the listing, the small
JSON files, and each safetensors header through ranged reads."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

from app.core.storage import NotFound, ObjectInfo, Storage
from workers.engine.errors import EngineError, ErrorCode
from workers.engine.files import choose_weight_files, is_pickle, unsafe
from workers.engine.safetensors_format import MAX_HEADER_BYTES, TensorInfo, read_header


def folder_files(storage: Storage, uri: str) -> dict[str, ObjectInfo]:
    """Top-level files of a checkpoint folder (or the one file), by name."""
    objects = storage.list(uri)
    if not objects:
        raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{uri}: no such object or folder", {"uri": uri})
    if len(objects) == 1 and objects[0].uri == uri:
        return {uri.rsplit("/", 1)[-1]: objects[0]}
    base = uri.rstrip("/") + "/"
    return {o.uri[len(base):]: o for o in objects if "/" not in o.uri[len(base):]}


def is_single_file(uri: str, files: dict[str, ObjectInfo]) -> bool:
    return len(files) == 1 and next(iter(files.values())).uri == uri


def weight_uris(storage: Storage, uri: str, files: dict[str, ObjectInfo]) -> list[str]:
    if is_single_file(uri, files):
        name = next(iter(files))
        if is_pickle(name):
            raise unsafe(uri)
        if not name.endswith(".safetensors"):
            raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{uri}: not a .safetensors file", {"uri": uri})
        return [uri]
    folder = uri.rstrip("/")
    names = choose_weight_files(folder, set(files), lambda n: storage.read_range(f"{folder}/{n}", 0,
                                                                                 files[n].size).decode())
    return [f"{folder}/{n}" for n in names]


def read_remote_header(storage: Storage, uri: str) -> dict[str, TensorInfo]:
    try:
        size = storage.size(uri)
        head = storage.read_range(uri, 0, 8)
    except NotFound:
        raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{uri}: no such object", {"uri": uri}) from None
    if len(head) == 8:
        (length,) = struct.unpack("<Q", head)
        if length <= MAX_HEADER_BYTES and 8 + length <= size:
            head = storage.read_range(uri, 0, 8 + length)
    return read_header(io.BytesIO(head), size, uri).tensors


def describe(storage: Storage, uri: str) -> dict[str, Any]:
    """Files, tensors (dtype and shape) and config of the checkpoint at `uri`; EngineError if it is unusable."""
    files = folder_files(storage, uri)
    tensors: dict[str, dict[str, Any]] = {}
    weights = weight_uris(storage, uri, files)
    for weight in weights:
        for name, info in read_remote_header(storage, weight).items():
            tensors[name] = {"dtype": info.dtype, "shape": list(info.shape), "file": weight.rsplit("/", 1)[-1]}
    config = None
    if "config.json" in files and files["config.json"].size < 1024 * 1024:
        try:
            config = json.loads(storage.read_range(files["config.json"].uri, 0, files["config.json"].size))
        except ValueError:
            config = None
    return {"files": [{"name": n, "size": o.size} for n, o in sorted(files.items())], "tensors": tensors,
            "size": sum(o.size for o in files.values()), "config": config}


def tensor_infos(tensors: dict[str, dict[str, Any]]) -> dict[str, TensorInfo]:
    """Header info as the layout check takes it, from a registered checkpoint's record."""
    return {name: TensorInfo(name, t["dtype"], tuple(t["shape"]), i, 0, t.get("file", ""))
            for i, (name, t) in enumerate(tensors.items())}
