"""A local, content-addressed cache of checkpoint files, shared by the worker processes of one machine.

Objects live once under `objects/<sha256>`; an index maps a remote identity (URI, size, ETag or mtime) to its
sha256, so a checkpoint used by many jobs is downloaded once. A job gets a folder of hard links named as in the
source folder, which the engine reads like any local checkpoint. Least recently used objects are evicted past
the size cap, never those a running job holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.core.checkpoints import folder_files, is_single_file
from app.core.storage import ObjectInfo, Storage
from workers.engine.files import is_pickle


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class CheckpointCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        for sub in ("objects", "index", "tmp", "views"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _index_path(self, info: ObjectInfo) -> Path:
        identity = json.dumps([info.uri, info.size, info.version])
        return self.root / "index" / hashlib.sha256(identity.encode()).hexdigest()

    def object_for(self, storage: Storage, info: ObjectInfo) -> tuple[Path, str]:
        """The cached file for one remote object, downloading it if needed: (path, sha256)."""
        index = self._index_path(info)
        if index.exists():
            digest = index.read_text().strip()
            path = self.root / "objects" / digest
            if path.exists():
                os.utime(index)
                return path, digest
        tmp = self.root / "tmp" / uuid.uuid4().hex
        try:
            storage.download(info.uri, tmp)
            digest = _sha256(tmp)
            path = self.root / "objects" / digest
            with self._locked():
                if not path.exists():
                    tmp.replace(path)
                index.write_text(digest)
        finally:
            tmp.unlink(missing_ok=True)
        return path, digest

    def materialize(self, storage: Storage, uri: str, dest: Path,
                    on_file: Callable[[str, int], None] | None = None) -> tuple[Path, dict[str, str]]:
        """Hard-link the checkpoint at `uri` into the folder `dest`; returns the path the engine reads (the folder,
        or the file for a single-file checkpoint) and file name -> sha256. Pickles are not fetched: the engine
        refuses them with a reason."""
        files = folder_files(storage, uri)
        dest.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, info in sorted(files.items()):
            if is_pickle(name):
                (dest / name).touch()  # present, so the engine can say what it refuses and why
                continue
            path, digests[name] = self.object_for(storage, info)
            target = dest / name
            target.unlink(missing_ok=True)
            os.link(path, target)
            if on_file:
                on_file(name, info.size)
        self.evict()
        return (dest / next(iter(files)) if is_single_file(uri, files) else dest), digests

    def evict(self) -> None:
        """Remove least recently used objects until the cache fits its cap; objects linked into a running job's
        folder have more than one link and are skipped."""
        with self._locked():
            objects = [p for p in (self.root / "objects").iterdir() if p.is_file()]
            total = sum(p.stat().st_size for p in objects)
            if total <= self.max_bytes:
                return
            for path in sorted(objects, key=lambda p: p.stat().st_atime):
                if total <= self.max_bytes:
                    break
                if path.stat().st_nlink > 1:
                    continue
                total -= path.stat().st_size
                path.unlink()

    @staticmethod
    def release(view: Path) -> None:
        shutil.rmtree(view, ignore_errors=True)
