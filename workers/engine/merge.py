"""Runs one merge from a SPEC: validate everything from headers, stream the statistics passes the method needs,
stream the merge into a temporary folder, and rename it into place only once it is complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from workers.engine import __version__, lwptv
from workers.engine.adaptive.loop import Adapted, AdaptRun
from workers.engine.adaptive.loop import fingerprint as adaptive_fingerprint
from workers.engine.adaptive.method import AdaptiveMethod
from workers.engine.adaptive.report import write_report
from workers.engine.allocator import tune_allocator
from workers.engine.card import model_card
from workers.engine.checkpoint import TORCH_DTYPES, Checkpoint, local_path
from workers.engine.errors import EngineError, ErrorCode
from workers.engine.files import INDEX_FILE, is_pickle
from workers.engine.layout import Layout, plan_layout, storage_order
from workers.engine.selection import global_thresholds
from workers.engine.spec import MergeSpec
from workers.engine.tensors import TensorSource
from workers.engine.writer import Planned, ShardedWriter, WrittenFile

MANIFEST = "merge_manifest.json"
LWPTV_FILE = "lwptv.json"
CARD = "README.md"
_NOT_COPIED = {INDEX_FILE, CARD, MANIFEST, LWPTV_FILE}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
ADAPT_PASSES = 20  # progress share of an adaptation, in passes over the shared tensors
# Below this many shared parameters, training ops are too small to amortise the intra-op pool's barriers, which
# cost 100x on a busy machine (measured: 13 ms vs 1.5 s per step on a 0.1M-parameter model, 2 cores, load 4).
THREADED_TRAINING_NUMEL = 1 << 22
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Progress:
    stage: str      # validate, lwptv, thresholds, adapt, merge, heads, finalize
    fraction: float  # of the whole merge, 0..1
    message: str
    metrics: dict[str, Any] | None = None  # adapt: step, loss per task


@dataclass(frozen=True)
class Resume:
    """Where an adaptive method keeps its state between attempts; `on_saved` is called after each save (the
    service uploads it, so a redelivered job resumes on any worker)."""

    path: Path
    on_saved: Callable[[Path], None] | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    manifest: dict[str, Any]


class _Tracker:
    """Turns processed element counts into an overall fraction; the callback may raise to cancel."""

    def __init__(self, callback: ProgressFn | None, total: int):
        self.callback, self.total, self.done, self.stage = callback, max(total, 1), 0, "validate"

    def enter(self, stage: str, message: str) -> None:
        self.stage = stage
        self._emit(message)

    def tick(self, numel: int, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.done += numel
        self._emit(message, metrics)

    def _emit(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        if self.callback:
            self.callback(Progress(self.stage, min(self.done / self.total, 1.0), message, metrics))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _input_digests(role: str, name: str, ckpt: Checkpoint, known: Mapping[Path, str]) -> dict[str, Any]:
    files = list(ckpt.files)
    if ckpt.folder and (ckpt.folder / "config.json").exists():
        files.append(ckpt.folder / "config.json")
    return {"role": role, "name": name, "model": ckpt.ref,
            "files": [{"path": p.name, "sha256": known.get(p) or _sha256(p), "size": p.stat().st_size}
                      for p in files]}


def _base_dtype(base: Checkpoint) -> torch.dtype:
    by_bytes: Counter[str] = Counter()
    for info in base.tensors.values():
        if info.is_float:
            by_bytes[info.dtype] += info.nbytes
    return TORCH_DTYPES[by_bytes.most_common(1)[0][0]] if by_bytes else torch.float32


def _prepare_out(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EngineError(ErrorCode.INVALID_PARAMETERS, f"{out_dir}: output exists and is not an empty folder; "
                          "choose a new path", {"path": str(out_dir)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


@contextmanager
def _torch_threads(n: int):
    """The engine parallelises over chunks on its own threads; torch's intra-op pool on top of that only adds
    barrier waits, which become catastrophic when other processes share the cores. Training (adaptive methods)
    is one big op at a time and takes the pool back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str | None) -> str:
    """'auto' (or None): CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_merge(spec: MergeSpec, out_dir: str | Path, progress: ProgressFn | None = None,
              threads: int | None = None, known_sha256: Mapping[Path, str] | None = None,
              device: str | None = "cpu", resume: Resume | None = None) -> MergeResult:
    """Merge as `spec` says into `out_dir`, which must not exist yet (or be empty). `progress` is called often
    with the stage and overall fraction; raising from it cancels the merge and leaves nothing behind.
    `known_sha256` spares hashing input files whose digest the caller already has (a content-addressed cache).
    `device`: where chunks are computed ('cpu', 'cuda', 'auto'); reading, statistics by partition and writing stay
    on the CPU, and the output bytes are the same on any device up to float rounding of the arithmetic.
    `resume`: where adaptive methods save their state and look for one to resume from."""
    threads = threads or default_threads()
    tune_allocator()
    with ThreadPoolExecutor(threads, thread_name_prefix="merge") as executor, _torch_threads(1):
        return _run(spec, Path(out_dir), progress, executor, threads, known_sha256 or {}, resolve_device(device),
                    resume)


def _run(spec: MergeSpec, out_dir: Path, progress: ProgressFn | None, executor: ThreadPoolExecutor,
         threads: int, known: Mapping[Path, str], device: str, resume: Resume | None) -> MergeResult:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    base = Checkpoint.open(spec.base_model)
    models = [Checkpoint.open(m.model) for m in spec.models]
    layout = plan_layout(spec, base.tensors, [m.tensors for m in models])
    timings["validate_s"] = time.perf_counter() - started
    tmp = _prepare_out(out_dir)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    digests = []
    try:
        digests += [hasher.submit(_input_digests, "base", "base", base, known)]
        digests += [hasher.submit(_input_digests, "model", m.task_name(), c, known)
                    for m, c in zip(spec.models, models, strict=True)]
        manifest = _merge_into(spec, base, models, layout, tmp, progress, timings, executor, threads, device,
                               resume)
        manifest["inputs"] = [d.result() for d in digests]
        manifest["timings"] = {k: round(v, 3) for k, v in {**timings,
                               "total_s": time.perf_counter() - started}.items()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        for d in digests:
            d.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(wait=True)
        for ckpt in (base, *models):
            ckpt.close()
    return MergeResult(out_dir, manifest)


def _merge_into(spec: MergeSpec, base: Checkpoint, models: list[Checkpoint], layout: Layout, tmp: Path,
                progress: ProgressFn | None, timings: dict[str, float], executor: ThreadPoolExecutor,
                threads: int, device: str, resume: Resume | None) -> dict[str, Any]:
    method = spec.method_cls()
    task_names = [m.task_name() for m in spec.models]
    weights = [m.weight for m in spec.models]
    out_dtype = _DTYPE_NAMES[spec.dtype] if spec.dtype else _base_dtype(base)
    params = {name: spec.params_for(name) for name in layout.shared}
    fractions = sorted({f for p in params.values() if (f := method.global_fraction(p)) is not None})
    sources = [TensorSource(name, base, models, [own[name] for own in layout.model_names],
                            [False] * len(models), weights, spec.seed, check_finite=True, executor=executor,
                            window=2 * threads, device=device)
               for name in layout.shared]
    shared_numel = sum(s.numel for s in sources)
    adaptive = isinstance(method, AdaptiveMethod)
    passes = (1 + 2 * len(fractions) + (3 if spec.lwptv and spec.lwptv.score == "saliency" else 1 if spec.lwptv
                                        else 0) + (ADAPT_PASSES if adaptive else 0))
    tracker = _Tracker(progress, shared_numel * passes)
    tracker.enter("validate", f"{len(layout.shared)} shared tensors, {len(task_names)} task models")

    def finished_pass() -> None:
        for source in sources:
            source.check_finite = False

    lwptv_report = None
    if spec.lwptv:
        t = time.perf_counter()
        tracker.enter("lwptv", f"scoring layers ({spec.lwptv.score})")
        result = lwptv.compute(spec.lwptv, sources, task_names, tracker.tick)
        for source in sources:
            source.pruned = result.pruned[source.name]
        lwptv_report = result.report
        finished_pass()
        timings["lwptv_s"] = time.perf_counter() - t

    thresholds: dict[float, list[float]] = {}
    if fractions:
        t = time.perf_counter()
        for fraction in fractions:
            tracker.enter("thresholds", f"global top-{fraction:g} magnitude thresholds")
            thresholds[fraction] = global_thresholds(sources, [fraction] * len(models), tracker.tick)
            finished_pass()
        timings["thresholds_s"] = time.perf_counter() - t

    adapted_files: list[Path] = []
    head_overrides: dict[str, dict[str, torch.Tensor]] = {}
    if adaptive:
        t = time.perf_counter()
        tracker.enter("adapt", f"learning coefficients with {spec.method}")
        with _torch_threads(threads if shared_numel >= THREADED_TRAINING_NUMEL else 1):
            adapted = _adapt(spec, method, sources, base, models, layout, task_names, device, resume, shared_numel,
                             tracker)
        finished_pass()
        head_overrides = adapted.heads
        adapted_files = write_report(adapted, task_names, spec.method_params.model_dump(), tmp)
        timings["adapt_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tracker.enter("merge", f"merging with {spec.method}")
    by_name = {s.name: s for s in sources}
    order = storage_order(base.tensors)
    planned = [Planned(n, out_dtype if base.tensors[n].is_float else TORCH_DTYPES[base.tensors[n].dtype],
                       base.tensors[n].shape) for n in order]
    writer = ShardedWriter(tmp, planned, spec.shard_bytes)
    for name in order:
        source = by_name.get(name)
        if source is None or all(source.pruned):
            _copy_base(base, name, writer, source)
            if source is not None:
                tracker.tick(source.numel)
            continue
        p = params[name]
        fraction = method.global_fraction(p)
        state = method.tensor_state(p, source, thresholds.get(fraction) if fraction is not None else None)
        for merged in source.map_chunks(lambda chunk, p=p, state=state: method.merge(p, chunk, state)):
            writer.write(name, merged)
            tracker.tick(merged.numel())
    outputs = writer.close()
    timings["merge_s"] = time.perf_counter() - t

    tracker.enter("heads", "writing task-specific tensors")
    heads = {task: names for task, names in zip(task_names, layout.heads, strict=True)}
    for ckpt, task, names in zip(models, task_names, layout.heads, strict=True):
        own = head_overrides.get(task, {})
        heads[task] = [*names, *(n for n in own if n not in names)]
        if heads[task]:
            outputs += _write_heads(ckpt, task, heads[task], tmp, own, out_dtype)

    tracker.enter("finalize", "writing config, model card and manifest")
    extra = _copy_side_files(base, tmp, out_dtype) + adapted_files
    if lwptv_report is not None:
        (tmp / LWPTV_FILE).write_text(json.dumps(lwptv_report, indent=2) + "\n")
        extra.append(tmp / LWPTV_FILE)
    dtype_name = str(out_dtype).removeprefix("torch.")
    (tmp / CARD).write_text(model_card(spec, heads, lwptv_report, dtype_name,
                                       [p.name for p in adapted_files]))
    extra.append(tmp / CARD)
    outputs += [WrittenFile(str(p.relative_to(tmp)), _sha256(p), p.stat().st_size) for p in extra]
    return {
        "engine": {"name": "mergeforge", "version": __version__, "torch": torch.__version__, "device": device},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json", by_alias=True),
        "dtype": dtype_name,
        "outputs": [{"path": f.path, "sha256": f.sha256, "size": f.size}
                    for f in sorted(outputs, key=lambda f: f.path)],
        "task_specific": {task: names for task, names in heads.items() if names},
    }


def _adapt(spec: MergeSpec, method: AdaptiveMethod, sources: list[TensorSource], base: Checkpoint,
           models: list[Checkpoint], layout: Layout, task_names: list[str], device: str, resume: Resume | None,
           shared_numel: int, tracker: _Tracker) -> Adapted:
    share = shared_numel * ADAPT_PASSES

    def on_step(step: int, steps: int, metrics: dict[str, Any]) -> None:
        tracker.tick(share // max(steps, 1), f"step {step}/{steps}: {metrics['metric']} {metrics['loss']:.4f}",
                     metrics)

    fingerprint = adaptive_fingerprint(spec.model_dump(mode="json", by_alias=True, include={
        "method", "parameters", "overrides", "lwptv", "task_specific", "seed"}) | {"tasks": task_names})
    run = AdaptRun(sources, models, layout.model_names, task_names,
                   [local_path(m.data) for m in spec.models if m.data],
                   [_tokenizer_folder(c, base) for c in models], torch.device(device), spec.seed, fingerprint,
                   on_step, resume.path if resume else None, resume.on_saved if resume else None)
    adapted = method.adapt(spec.method_params, run)
    if adapted.resumed_from:
        tracker.tick(share * adapted.resumed_from // max(spec.method_params.steps, 1),
                     f"resumed from step {adapted.resumed_from}")
    return adapted


def _tokenizer_folder(ckpt: Checkpoint, base: Checkpoint) -> Path | None:
    """The task's own tokenizer, else the base's."""
    for folder in (ckpt.folder, base.folder):
        if folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES):
            return folder
    return None


def _copy_base(base: Checkpoint, name: str, writer: ShardedWriter, source: TensorSource | None) -> None:
    """Write a base tensor unchanged but for the output dtype, chunk by chunk."""
    if source is None:
        writer.write(name, base.read(name))
        return
    for rows in source.row_ranges:
        writer.write(name, base.read(name, rows))


def _write_heads(ckpt: Checkpoint, task: str, names: list[str], tmp: Path,
                 overrides: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> list[WrittenFile]:
    """A task's own tensors; `overrides` (adaptive methods' tinted layers) replace or add tensors, in the
    checkpoint's dtype for its own tensors and the output dtype for added copies of shared ones."""
    entries = [Planned(n, TORCH_DTYPES[ckpt.tensors[n].dtype] if n in ckpt.tensors else out_dtype,
                       tuple(overrides[n].shape) if n in overrides else ckpt.tensors[n].shape) for n in names]
    writer = ShardedWriter(tmp / "heads", entries, filename=f"{task}.safetensors")
    for entry in entries:
        writer.write(entry.name, overrides[entry.name].to(entry.dtype) if entry.name in overrides
                     else ckpt.read(entry.name))
    return [WrittenFile(f"heads/{f.path}", f.sha256, f.size) for f in writer.close()]


def _copy_side_files(base: Checkpoint, tmp: Path, out_dtype: torch.dtype) -> list[Path]:
    """Config, tokenizer and other non-weight files of the base folder; config's dtype set to the output's."""
    copied: list[Path] = []
    folder = base.folder
    if folder is None:
        return copied
    for path in sorted(folder.iterdir()):
        if (not path.is_file() or path.name in _NOT_COPIED or path.suffix == ".safetensors"
                or is_pickle(path.name) or path.name.startswith(".")):
            continue
        target = tmp / path.name
        if path.name == "config.json":
            config = json.loads(path.read_text())
            dtype_name = str(out_dtype).removeprefix("torch.")
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = dtype_name
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(path, target)
        copied.append(target)
    return copied
