"""Engine throughput benchmark: MergeForge against mergekit on a synthetic ~215M-parameter Llama.

What it measures
----------------
* Inputs: a synthetic Llama-shaped checkpoint (hidden 1024, intermediate 2688, 12 layers, 16 heads, vocab
  32000, untied embeddings: 214,983,680 parameters, bf16, ~430 MB) in Hugging Face layout (config.json,
  ~200 MB safetensors shards, model.safetensors.index.json), plus three "fine-tunes" = base + N(0, 0.002)
  deltas. They are generated once into the work folder (default `.bench/` at the repo root) and reused. The
  generator writes the safetensors files itself, one tensor at a time, so it never holds a whole model.
* For each merge method (task_arithmetic with lambda 0.3; TIES with density 0.2 ranked per tensor, sign by
  sum, disjoint mean, lambda 1), both tools run in their own subprocess on the same inputs:
  `mergekit-yaml CONFIG OUT` and `mergeforge merge SPEC OUT` (or `python -m workers.engine.cli merge SPEC
  OUT` when the console script is not installed). Each run is timed (wall clock from spawn to exit,
  interpreter start and imports included) and its peak resident memory recorded (see `run_measured`).
* The I/O floor: reading every input file once (4 models) in 16 MiB blocks, and the same plus writing one
  output-sized file; no merge can beat the first on this machine.
* Every measurement is taken with a warm page cache: all inputs are read once, untimed, before any timing.
* Each measurement is repeated (`--repeats`, default 3) and the table reports medians. mergekit's TIES
  takes 1.5-2.5 min a run at full size on 2 cores, so it runs once unless `--mergekit-repeats` says
  otherwise (the default full run then takes ~5 min once the models exist; generating them adds ~40 s).
* Output equality: the last merged model of each tool is compared tensor by tensor (one tensor in memory at
  a time): max |a - b|, how many entries differ at all and by more than one bf16 ulp (or 1e-6, whichever is
  larger). mergekit is told to compute in float32 (`dtype: float32`, `out_dtype: bfloat16`) because
  MergeForge always computes in float32, so the two should differ by final rounding only. For TIES, the
  trim keeps exactly k entries of each task vector per tensor, and bf16 checkpoints give task vectors with
  few distinct values, so many entries tie at the k-th largest magnitude; which tied entries survive is each
  tool's choice (mergekit's is torch.argsort's unspecified order). TIES is elementwise after the trim, so
  differences at those positions are counted apart (see `TrimTies`) and the verdict is on the rest.

How to run
----------
    python benchmarks/engine_throughput.py                          # full size, both methods
    python benchmarks/engine_throughput.py --scale 0.1 --repeats 1  # quick check on a 1-layer model
    python benchmarks/engine_throughput.py --methods ties --mergekit-repeats 3
    python benchmarks/engine_throughput.py --skip-mergekit

This is a benchmark, not a test: it never asserts a target. It exits non-zero only when a tool fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16 * 2**20
SHARD_BYTES = 200 * 10**6
BASE_STD = 0.02
DELTA_STD = 0.002
BASE_SEED = 1234
N_FINETUNES = 3
POLL_S = 0.05
ATOL = 1e-6
GENERATOR_VERSION = 2
TOOLS = ("mergekit", "mergeforge")


@dataclass(frozen=True)
class Method:
    name: str
    mergekit_parameters: dict[str, Any]
    mergekit_model_parameters: dict[str, Any]
    mergeforge_parameters: dict[str, Any]
    mergekit_max_repeats: int | None = None  # default cap on mergekit's runs, where one run is slow


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(
        name="task_arithmetic",
        # mergekit: base + lambda * sum_k w_k tau_k (normalize defaults to false for task_arithmetic).
        mergekit_parameters={"lambda": 0.3},
        mergekit_model_parameters={"weight": 1.0},
        mergeforge_parameters={"lambda": 0.3},
    ),
    "ties": Method(
        name="ties",
        # mergekit: per-tensor magnitude trim to `density`, sign of the weighted sum, mean over agreeing
        # entries (normalize defaults to true for ties), then lambda.
        mergekit_parameters={"lambda": 1.0, "normalize": True},
        mergekit_model_parameters={"weight": 1.0, "density": 0.2},
        mergeforge_parameters={"density": 0.2, "lambda": 1.0, "consensus": "sum", "merge": "mean",
                               "scope": "tensor"},
        mergekit_max_repeats=1,  # 1.5-2.5 min a run at full size on 2 cores
    ),
}


# ----------------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ----------------------------------------------------------------------------------------------------


def llama_config(scale: float) -> Any:
    from transformers import LlamaConfig

    layers = max(1, round(12 * scale))
    vocab = 32000 if scale >= 1 else max(512, round(32000 * scale / 64) * 64)
    return LlamaConfig(
        hidden_size=1024,
        intermediate_size=2688,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def tensor_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's weights, from a model on the meta device (no memory allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def make_tensor(name: str, shape: tuple[int, ...], index: int, finetune: int) -> torch.Tensor:
    """Tensor `index` of the base (finetune 0) or of fine-tune `finetune`, in bf16, deterministic.

    The base tensor is regenerated from its own seed for every model, so each model is written one tensor at a
    time without keeping the base around.
    """
    gen = torch.Generator().manual_seed(BASE_SEED * 1_000_003 + index)
    if name.endswith("norm.weight"):
        base = torch.ones(shape, dtype=torch.float32)
    else:
        base = torch.empty(shape, dtype=torch.float32).normal_(0.0, BASE_STD, generator=gen)
    base = base.to(torch.bfloat16)
    if finetune == 0:
        return base
    gen = torch.Generator().manual_seed((BASE_SEED + 7919 * finetune) * 1_000_003 + index)
    delta = torch.empty(shape, dtype=torch.float32).normal_(0.0, DELTA_STD, generator=gen)
    return (base.float() + delta).to(torch.bfloat16)


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], indices: list[int],
                      finetune: int) -> None:
    """Write one safetensors file, streaming tensor by tensor (header first, then each tensor's bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in indices:
        name, shape = shapes[i]
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i in indices:
            name, shape = shapes[i]
            t = make_tensor(name, shape, i, finetune)
            f.write(t.view(torch.uint16).numpy().tobytes())
            del t
    tmp.replace(path)


def write_model(folder: Path, config: Any, shapes: list[tuple[str, tuple[int, ...]]], finetune: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards = plan_shards(shapes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for s, indices in enumerate(shards, start=1):
        fname = f"model-{s:05d}-of-{n:05d}.safetensors"
        write_safetensors(folder / fname, shapes, indices, finetune)
        weight_map.update({shapes[i][0]: fname for i in indices})
    total = sum(math.prod(shape) * 2 for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def ensure_models(workdir: Path, scale: float) -> tuple[Path, list[Path], int]:
    """Generate (or reuse) the base and fine-tunes; returns their folders and the parameter count."""
    config = llama_config(scale)
    shapes = tensor_shapes(config)
    n_params = sum(math.prod(s) for _, s in shapes)
    root = workdir / f"llama-{config.num_hidden_layers}L-v{config.vocab_size}"
    stamp = {"version": GENERATOR_VERSION, "params": n_params, "base_std": BASE_STD, "delta_std": DELTA_STD,
             "seed": BASE_SEED, "finetunes": N_FINETUNES}
    names = ["base"] + [f"ft{k}" for k in range(1, N_FINETUNES + 1)]
    folders = [root / name for name in names]
    done = root / "DONE.json"
    if done.exists() and json.loads(done.read_text()) == stamp and all(f.is_dir() for f in folders):
        print(f"reusing models in {root}", flush=True)
    else:
        if root.exists():
            shutil.rmtree(root)
        for k, folder in enumerate(folders):
            t0 = time.perf_counter()
            write_model(folder, config, shapes, k)
            print(f"generated {folder} ({n_params / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        done.write_text(json.dumps(stamp) + "\n")
    return folders[0], folders[1:], n_params


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------------------------------
# Measuring a subprocess
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    output: str


def _poll_tree_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak[0] = max(peak[0], total)
        stop.wait(POLL_S)


# The kernel's peak RSS of a process includes the RSS of the process it was forked from (Linux keeps the
# pre-exec high-water mark), so a tool spawned straight from this benchmark, which holds merged tensors while
# it compares outputs, would inherit this process's size. A small wrapper forks the tool instead and reports
# the tool's own ru_maxrss.
_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> RunResult:
    """Run `cmd`, returning its wall time and peak RSS.

    Peak RSS is the larger of two readings:
    * the kernel's high-water mark (ru_maxrss) of the tool's process, read by a small wrapper process that
      forks it (see `_WRAPPER`). It never misses a short spike, but for a tree it is the largest single process.
    * the sum of RSS over the tool's process tree, sampled with psutil every 50 ms, which covers tools that fan
      out into worker processes (where the sum is what the machine must hold) but can miss a spike.
    """
    peak_file = log.with_suffix(".maxrss")
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(peak_file), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        stop = threading.Event()
        peak = [0]
        poller = threading.Thread(target=_poll_tree_rss, args=(proc.pid, stop, peak), daemon=True)
        poller.start()
        proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        poller.join()
    kernel_peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else 0  # Linux reports KiB
    text = log.read_text(errors="replace")
    return RunResult(wall, max(kernel_peak, peak[0]) / 2**20, proc.returncode, text)


def read_all(files: list[Path]) -> int:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def write_bytes(path: Path, nbytes: int) -> None:
    block = bytes(BLOCK)
    with path.open("wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            n = min(left, BLOCK)
            f.write(block[:n] if n < BLOCK else block)
            left -= n


# ----------------------------------------------------------------------------------------------------
# The two tools
# ----------------------------------------------------------------------------------------------------


def mergekit_command(method: Method, base: Path, finetunes: list[Path], cfg: Path, out: Path) -> list[str]:
    config = {
        "merge_method": method.name,
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": dict(method.mergekit_model_parameters)}
                   for ft in finetunes],
        "parameters": dict(method.mergekit_parameters),
        # float32 compute, as MergeForge; bf16 output, as the inputs.
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        raise SystemExit("mergekit-yaml is not on PATH (pip install mergekit), or pass --skip-mergekit")
    # CPU only; --lazy-unpickle only matters for pickled .bin checkpoints, not safetensors.
    return [exe, str(cfg), str(out), "--out-shard-size", "5B", "--no-copy-tokenizer", "--quiet"]


def mergeforge_command(method: Method, base: Path, finetunes: list[Path], spec_path: Path,
                       out: Path) -> list[str]:
    spec = {
        "method": method.name,
        "base_model": str(base),
        "models": [{"model": str(ft), "name": ft.name, "weight": 1.0} for ft in finetunes],
        "parameters": dict(method.mergeforge_parameters),
        "dtype": "bfloat16",
        "shard_size": "5GB",
    }
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    exe = shutil.which("mergeforge")
    prefix = [exe] if exe else [sys.executable, "-m", "workers.engine.cli"]
    return [*prefix, "merge", "-q", str(spec_path), str(out)]  # no progress bar, as mergekit's --quiet


# ----------------------------------------------------------------------------------------------------
# Comparing merged models
# ----------------------------------------------------------------------------------------------------


def tensor_locations(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index if there is one, else from the files' headers."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / fname for name, fname in weight_map.items()}
    where: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at |x| (x in [2^(e-1), 2^e) has ulp 2^(e-8)); the smallest normal's spacing at 0."""
    _, exponent = torch.frexp(x.abs())
    ulp = torch.ldexp(torch.ones_like(x), exponent - 8)
    return torch.clamp(ulp, min=torch.finfo(torch.bfloat16).tiny * 2**-7)


class TrimTies:
    """Positions where the TIES trim of some task vector must choose among equal magnitudes.

    The trim keeps k = max(1, int(density * n)) entries of each |tau_k| per tensor. When more entries than fit
    share the k-th largest magnitude, which of them survive is the tool's choice (mergekit: torch.argsort's
    order, unspecified for equal keys). bf16 checkpoints make such ties common, since their task vectors take
    few distinct values. Everything after the trim is elementwise, so two correct tools can differ only at these
    positions; the comparison counts differences there apart from the rest.
    """

    def __init__(self, base: Path, finetunes: list[Path], density: float):
        self.density = density
        self.base = tensor_locations(base)
        self.finetunes = [tensor_locations(ft) for ft in finetunes]

    def mask(self, name: str) -> torch.Tensor | None:
        if name not in self.base or any(name not in ft for ft in self.finetunes):
            return None
        with safe_open(str(self.base[name]), framework="pt") as f:
            base = f.get_tensor(name).float()
        n = base.numel()
        k = max(1, int(self.density * n))
        out = torch.zeros(n, dtype=torch.bool)
        if k >= n:
            return out.reshape(base.shape)
        for ft in self.finetunes:
            with safe_open(str(ft[name]), framework="pt") as f:
                mags = (f.get_tensor(name).float() - base).abs_().reshape(-1)
            part = mags.numpy().copy()
            part.partition(n - k)
            threshold = float(part[n - k])
            del part
            equal = mags == threshold
            if int((mags > threshold).sum()) + int(equal.sum()) > k:  # more tied entries than places left
                out |= equal
        return out.reshape(base.shape)


@dataclass
class Comparison:
    tensors: int = 0
    elements: int = 0
    max_abs_diff: float = 0.0
    differing: int = 0
    beyond_ulp: int = 0  # outside trim-tie positions, when those are known
    tie_positions: int | None = None
    beyond_ulp_at_ties: int = 0
    not_allclose: list[str] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)

    @property
    def equal_within_rounding(self) -> bool:
        return not (self.beyond_ulp or self.only_in_a or self.only_in_b or self.dtype_mismatch)

    def summary(self) -> str:
        if self.tensors == 0:
            return "no common tensors"
        if self.tie_positions is None:
            verdict = "equal within bf16 rounding" if self.equal_within_rounding else "DIFFERENT"
            where = ""
        else:
            verdict = ("equal within bf16 rounding outside trim ties" if self.equal_within_rounding
                       else "DIFFERENT outside trim ties")
            where = " outside trim ties"
        text = (f"{verdict}: max abs diff {self.max_abs_diff:.3g}, {self.differing:,} of "
                f"{self.elements:,} entries differ ({self.differing / self.elements:.4%}), "
                f"{self.beyond_ulp:,}{where} by more than 1 bf16 ulp (and {ATOL:g})")
        if self.tie_positions is not None:
            text += (f"; at the {self.tie_positions:,} positions ({self.tie_positions / self.elements:.2%}) "
                     f"where a task vector has more entries tied at its k-th largest magnitude than the trim "
                     f"keeps, {self.beyond_ulp_at_ties:,} differ by more (which tied entries survive is "
                     f"each tool's choice)")
        if self.not_allclose:
            text += f"; {len(self.not_allclose)} tensors fail allclose(rtol=1/128)"
        if self.only_in_a or self.only_in_b:
            text += (f"; tensors only in mergekit: {len(self.only_in_a)}, "
                     f"only in MergeForge: {len(self.only_in_b)}")
        if self.dtype_mismatch:
            text += f"; dtype differs in {len(self.dtype_mismatch)} tensors"
        return text


@contextlib.contextmanager
def open_files(paths: set[Path]) -> Iterator[dict[Path, Any]]:
    with contextlib.ExitStack() as stack:
        yield {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in paths}


def compare_models(a_dir: Path, b_dir: Path, ties: TrimTies | None = None) -> Comparison:
    """Compare two merged models tensor by tensor, one tensor (and its trim-tie mask) in memory at a time."""
    a_where, b_where = tensor_locations(a_dir), tensor_locations(b_dir)
    result = Comparison(only_in_a=sorted(set(a_where) - set(b_where)),
                        only_in_b=sorted(set(b_where) - set(a_where)),
                        tie_positions=None if ties is None else 0)
    common = sorted(set(a_where) & set(b_where))
    with open_files(set(a_where.values())) as fa, open_files(set(b_where.values())) as fb:
        for name in common:
            a = fa[a_where[name]].get_tensor(name)
            b = fb[b_where[name]].get_tensor(name)
            if a.dtype != b.dtype:
                result.dtype_mismatch.append(name)
            if a.shape != b.shape:
                result.only_in_a.append(f"{name} (shape {tuple(a.shape)} vs {tuple(b.shape)})")
                continue
            a32, b32 = a.float(), b.float()
            diff = (a32 - b32).abs()
            result.tensors += 1
            result.elements += diff.numel()
            result.max_abs_diff = max(result.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)
            result.differing += int((diff > 0).sum())
            # One bf16 ulp of the larger value, but at least ATOL: near zero the exact result cancels and
            # float32 summation order alone moves it by ~1e-10, many ulps of so small a number.
            beyond = diff > torch.clamp(bf16_ulp(torch.maximum(a32.abs(), b32.abs())), min=ATOL)
            mask = ties.mask(name) if ties is not None else None
            if mask is not None and result.tie_positions is not None:
                result.tie_positions += int(mask.sum())
                result.beyond_ulp_at_ties += int((beyond & mask).sum())
                beyond &= ~mask
            result.beyond_ulp += int(beyond.sum())
            if mask is None and not torch.allclose(a32, b32, rtol=1 / 128, atol=ATOL):
                result.not_allclose.append(name)
            del a, b, a32, b32, diff, beyond, mask
    return result


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


@dataclass
class Series:
    walls: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    failed: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def peak(self) -> float | None:
        return statistics.median(self.rss) if self.rss else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench",
                   help="cache of generated models, configs, outputs and logs (default: .bench/ at the "
                   "repo root)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                   help="merge methods to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    p.add_argument("--mergekit-repeats", type=int, default=None,
                   help="runs per mergekit measurement (default: --repeats, but 1 for ties, whose mergekit "
                   "run takes 1.5-2.5 min at full size on 2 cores)")
    p.add_argument("--skip-mergekit", action="store_true", help="run MergeForge and the I/O floor only")
    p.add_argument("--scale", type=float, default=1.0,
                   help="model size factor on layers and vocab (0.1 gives a 1-layer model for a quick check)")
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.mergekit_repeats is not None and args.mergekit_repeats < 1):
        p.error("repeats must be at least 1")
    if not 0 < args.scale <= 1:
        p.error("--scale is in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tools = [t for t in TOOLS if not (t == "mergekit" and args.skip_mergekit)]

    base, finetunes, n_params = ensure_models(workdir, args.scale)
    inputs = [p for folder in [base, *finetunes] for p in model_files(folder)]
    input_bytes = sum(p.stat().st_size for p in inputs)
    output_bytes = n_params * 2
    runs = base.parent / "runs"  # per model size, next to its inputs
    runs.mkdir(exist_ok=True)

    # Warm the page cache (untimed), then time the I/O floor.
    read_all(inputs)
    floor_read: list[float] = []
    floor_rw: list[float] = []
    scratch = runs / "io-floor.bin"
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        read_all(inputs)
        floor_read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_all(inputs)
        write_bytes(scratch, output_bytes)
        floor_rw.append(time.perf_counter() - t0)
        scratch.unlink()
    print(f"I/O floor (warm cache): read {input_bytes / 1e9:.2f} GB in {statistics.median(floor_read):.2f} s",
          flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")

    results: dict[tuple[str, str], Series] = {}
    comparisons: dict[str, str] = {}
    failed = False
    for mname in args.methods:
        method = METHODS[mname]
        outs: dict[str, Path] = {}
        cmds: dict[str, list[str]] = {}
        for tool in tools:
            outs[tool] = runs / f"{mname}-{tool}"
            if tool == "mergekit":
                cmds[tool] = mergekit_command(method, base, finetunes, runs / f"{mname}-mergekit.yaml",
                                              outs[tool])
            else:
                cmds[tool] = mergeforge_command(method, base, finetunes, runs / f"{mname}-mergeforge.yaml",
                                                outs[tool])
            results[(mname, tool)] = Series()
        wanted = {"mergeforge": args.repeats,
                  "mergekit": args.mergekit_repeats or min(args.repeats, method.mergekit_max_repeats or 10**6)}
        for rep in range(max(wanted[t] for t in tools)):
            for tool in tools:  # interleaved, so drift in machine load hits both tools alike
                series = results[(mname, tool)]
                if series.failed or rep >= wanted[tool]:
                    continue
                shutil.rmtree(outs[tool], ignore_errors=True)
                log = runs / f"{mname}-{tool}-{rep + 1}.log"
                res = run_measured(cmds[tool], log, env)
                if res.returncode != 0:
                    series.failed = f"exit {res.returncode}"
                    failed = True
                    print(f"\n{tool} {mname} FAILED (exit {res.returncode}): {shlex.join(cmds[tool])}\n"
                          f"log: {log}\n{tail(res.output)}\n", file=sys.stderr, flush=True)
                    continue
                series.walls.append(res.wall_s)
                series.rss.append(res.peak_rss_mb)
                print(f"{mname:16s} {tool:10s} run {rep + 1}: {res.wall_s:7.2f} s, peak RSS "
                      f"{res.peak_rss_mb:8.1f} MB", flush=True)
        ok = [t for t in tools if not results[(mname, t)].failed]
        if len(ok) == 2:
            density = method.mergeforge_parameters.get("density")
            ties = TrimTies(base, finetunes, density) if mname == "ties" and density is not None else None
            comparisons[mname] = compare_models(outs["mergekit"], outs["mergeforge"], ties).summary()
        elif len(tools) < 2:
            comparisons[mname] = "not compared (--skip-mergekit)"
        else:
            comparisons[mname] = "not compared (a tool failed)"

    print_report(args, n_params, input_bytes, floor_read, floor_rw, results, comparisons, tools)
    return 1 if failed else 0


def print_report(args: argparse.Namespace, n_params: int, input_bytes: int, floor_read: list[float],
                 floor_rw: list[float], results: dict[tuple[str, str], Series], comparisons: dict[str, str],
                 tools: list[str]) -> None:
    cpu = platform.processor() or platform.machine()
    print()
    print(f"Synthetic Llama, {n_params / 1e6:.1f}M params, bf16; base + {N_FINETUNES} fine-tunes "
          f"({input_bytes / 1e9:.2f} GB of inputs). {os.cpu_count()} CPUs ({cpu}), "
          f"torch {torch.__version__}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM. Warm page cache for every measurement. "
          f"Medians of the runs listed. mergekit computes in float32 "
          f"(dtype: float32, out_dtype: bfloat16), as MergeForge does.")
    print()
    print("| method | tool | median wall s | median peak RSS MB | runs (s) | x I/O floor "
          "| mergekit/MergeForge time | MergeForge/mergekit RSS | output equality |")
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    read_floor = statistics.median(floor_read)
    print(f"| I/O floor | read 4 inputs (16 MiB blocks) | {read_floor:.2f} | - | "
          f"{', '.join(f'{x:.2f}' for x in floor_read)} | 1.00 | - | - | - |")
    print(f"| I/O floor | read 4 inputs + write 1 output | {statistics.median(floor_rw):.2f} | - | "
          f"{', '.join(f'{x:.2f}' for x in floor_rw)} | {statistics.median(floor_rw) / read_floor:.2f} "
          f"| - | - | - |")
    for mname in args.methods:
        mk = results.get((mname, "mergekit"))
        mf = results.get((mname, "mergeforge"))
        time_ratio = rss_ratio = None
        if mk and mf and mk.wall and mf.wall and mk.peak and mf.peak:
            time_ratio = mk.wall / mf.wall
            rss_ratio = mf.peak / mk.peak
        for tool in tools:
            s = results[(mname, tool)]
            label = "MergeForge" if tool == "mergeforge" else "mergekit"
            walls = "FAILED " + s.failed if s.failed else ", ".join(f"{x:.2f}" for x in s.walls)
            x_floor = s.wall / read_floor if s.wall else None
            first = tool == tools[-1]
            print(f"| {mname} | {label} | {fmt(s.wall)} | {fmt(s.peak, '.0f')} | {walls} "
                  f"| {fmt(x_floor, '.1f')} "
                  f"| {fmt(time_ratio) if first else ''} | {fmt(rss_ratio) if first else ''} "
                  f"| {comparisons.get(mname, '') if first else ''} |")


if __name__ == "__main__":
    sys.exit(main())
