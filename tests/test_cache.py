"""The worker's content-addressed checkpoint cache, on real files through the file:// storage backend."""

from __future__ import annotations

import hashlib
import os

from app.core.storage import FileStorage
from workers.cache import CheckpointCache


def _folder(root, name: str, files: dict[str, bytes]):
    folder = root / name
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


def test_shared_files_are_stored_once_and_reused(tmp_path):
    storage = FileStorage()
    shared = b"x" * 1000
    a = _folder(tmp_path / "src", "a", {"model.safetensors": shared, "config.json": b"{}"})
    b = _folder(tmp_path / "src", "b", {"model.safetensors": shared, "config.json": b'{"b": 1}'})
    cache = CheckpointCache(tmp_path / "cache", max_bytes=10**9)
    path_a, digests_a = cache.materialize(storage, a.as_uri(), tmp_path / "job1" / "a")
    path_b, digests_b = cache.materialize(storage, b.as_uri(), tmp_path / "job1" / "b")
    assert path_a == tmp_path / "job1" / "a" and (path_a / "model.safetensors").read_bytes() == shared
    assert digests_a["model.safetensors"] == digests_b["model.safetensors"] == hashlib.sha256(shared).hexdigest()
    objects = sorted(p.name for p in (tmp_path / "cache" / "objects").iterdir())
    assert objects == sorted({hashlib.sha256(d).hexdigest() for d in (shared, b"{}", b'{"b": 1}')})
    # the job's files are hard links to the one stored copy
    assert os.stat(path_a / "model.safetensors").st_ino == os.stat(path_b / "model.safetensors").st_ino
    # a second job reuses the stored copy when the source is unchanged (same size and mtime)
    (a / "model.safetensors").rename(tmp_path / "moved")
    os.link(tmp_path / "moved", a / "model.safetensors")  # same bytes, same mtime: same identity
    again, _ = cache.materialize(storage, a.as_uri(), tmp_path / "job2" / "a")
    assert os.stat(again / "model.safetensors").st_ino == os.stat(path_a / "model.safetensors").st_ino


def test_a_changed_source_is_fetched_again(tmp_path):
    storage = FileStorage()
    a = _folder(tmp_path / "src", "a", {"model.safetensors": b"one"})
    cache = CheckpointCache(tmp_path / "cache", max_bytes=10**9)
    cache.materialize(storage, a.as_uri(), tmp_path / "job1")
    (a / "model.safetensors").write_bytes(b"two!")
    path, digests = cache.materialize(storage, a.as_uri(), tmp_path / "job2")
    assert (path / "model.safetensors").read_bytes() == b"two!"
    assert digests["model.safetensors"] == hashlib.sha256(b"two!").hexdigest()


def test_eviction_keeps_the_cap_and_spares_files_in_use(tmp_path):
    storage = FileStorage()
    cache = CheckpointCache(tmp_path / "cache", max_bytes=2500)
    views = []
    for i in range(4):
        src = _folder(tmp_path / "src", f"m{i}", {"model.safetensors": bytes([i]) * 1000})
        views.append(cache.materialize(storage, src.as_uri(), tmp_path / f"job{i}")[0])
    objects = list((tmp_path / "cache" / "objects").iterdir())
    # every view is still in use (hard-linked), so nothing could be evicted yet
    assert len(objects) == 4
    for view in views[:3]:
        CheckpointCache.release(view)
    cache.evict()
    left = {p.name for p in (tmp_path / "cache" / "objects").iterdir()}
    assert sum((tmp_path / "cache" / "objects" / n).stat().st_size for n in left) <= 2500
    assert hashlib.sha256(bytes([3]) * 1000).hexdigest() in left  # the one still in use
    assert (views[3] / "model.safetensors").read_bytes() == bytes([3]) * 1000


def test_pickles_are_not_fetched(tmp_path):
    storage = FileStorage()
    src = _folder(tmp_path / "src", "p", {"pytorch_model.bin": b"\x80\x04pickle", "config.json": b"{}"})
    cache = CheckpointCache(tmp_path / "cache", max_bytes=10**9)
    path, digests = cache.materialize(storage, src.as_uri(), tmp_path / "job")
    assert (path / "pytorch_model.bin").read_bytes() == b""  # a placeholder, so the engine can name it
    assert set(digests) == {"config.json"}
