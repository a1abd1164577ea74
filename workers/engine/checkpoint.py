"""Opens checkpoints (a Hugging Face folder or one .safetensors file) and reads tensors lazily, row range by row
range, with plain positional reads: memory holds only what was asked for, never the model (no mmap residue)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.engine.errors import EngineError, ErrorCode
from workers.engine.files import choose_weight_files, is_pickle, unsafe
from workers.engine.safetensors_format import TensorInfo, read_header_file

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def local_path(ref: str) -> Path:
    if ref.startswith("file://"):
        return Path(ref.removeprefix("file://"))
    if "://" in ref:
        raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{ref}: the engine reads local paths; fetch remote "
                          "checkpoints first (the service does this for you)", {"path": ref})
    return Path(ref)


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint, refusing pickles and adapters with a reason."""
    if not root.exists():
        raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{root}: no such file or folder", {"path": str(root)})
    if root.is_file():
        if is_pickle(root.name):
            raise unsafe(str(root))
        if root.suffix != ".safetensors":
            raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{root}: not a .safetensors file", {"path": str(root)})
        return [root]
    names = {p.name for p in root.iterdir() if p.is_file()}
    return [root / n for n in choose_weight_files(str(root), names, lambda n: (root / n).read_text())]


@dataclass
class Checkpoint:
    """Tensor names, shapes and dtypes from the headers; data read on demand."""

    ref: str
    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    file_of: dict[str, Path]
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, ref: str) -> Checkpoint:
        root = local_path(ref)
        files = weight_files(root)
        tensors: dict[str, TensorInfo] = {}
        file_of: dict[str, Path] = {}
        for path in files:
            for name, info in read_header_file(path).tensors.items():
                if name in tensors:
                    raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{root}: tensor {name!r} appears in both "
                                      f"{file_of[name].name} and {path.name}", {"tensor": name})
                tensors[name] = info
                file_of[name] = path
        if not tensors:
            raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{root}: the checkpoint holds no tensors",
                              {"path": str(root)})
        return cls(ref, root, files, tensors, file_of)

    @property
    def folder(self) -> Path | None:
        return self.root if self.root.is_dir() else None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` in its stored dtype, or only rows [start, stop) of its first dimension."""
        info = self.tensors[name]
        shape = list(info.shape)
        offset, nbytes = info.start, info.nbytes
        if rows is not None and shape:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape[0] = rows[1] - rows[0]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = self._fd(self.file_of[name])
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise EngineError(ErrorCode.INVALID_CHECKPOINT, f"{self.file_of[name]}: file ended while reading "
                                  f"tensor {name!r}; it was truncated after it was opened", {"tensor": name})
            done += n
        return buffer.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
