"""AdaMerging step cost: MergeForge's adaptation against FusionBench's `LayerWiseMergedModel` loop, same run.

What it measures
----------------
* Inputs: the quality benchmark's base model and six experts (all-MiniLM-L6-v2, 22.7M parameters; run
  `python -m benchmarks.quality.prepare` first) and each task's unlabeled texts, cut to `--max-length` tokens.
* MergeForge: `run_merge` with `adamerging` layer-wise (init 0.3, clamp, Adam lr 1e-3, `--batch-size` inputs per
  task and step); the step times are the `step_s` the engine reports with each step's progress event.
* FusionBench (`fusion-bench`, PyPI): its `LayerWiseMergedModel` over the experts' bodies (one coefficient per task
  and parameter tensor, the same 0.3 / clamp / Adam), driven as its `LayerWiseAdaMergingAlgorithm` drives it: per
  task a forward through `functional_call`, the head, the entropy and `backward(retain_graph=True)`, then the
  optimiser step and `merge_weights()`, which rebuilds the merged state dict under autograd (`strict=False`: BERT's
  non-persistent buffers are not in the state dict it builds). Batches are drawn the
  same way (per-task shuffles, padded to the longest input of the batch); both run in eval mode.
* Each side runs in its own subprocess, `--repeats` times; a run's first `--warmup` steps are not counted. The
  table gives the median step time over all counted steps, the run's peak memory (CPU: the process's peak RSS;
  CUDA: the allocator's peak) and FusionBench / MergeForge ratios.

    python benchmarks/adamerging_step.py [--steps 30] [--repeats 3] [--device cpu|cuda]

A benchmark, not a test: it asserts no target.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def tasks_of(prepared: Path) -> list[str]:
    return [t["name"] for t in json.loads((prepared / "prepared.json").read_text())["tasks"]]


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mergeforge(prepared: Path, args: argparse.Namespace) -> dict:
    from workers.engine.merge import run_merge
    from workers.engine.spec import MergeSpec

    tasks = tasks_of(prepared)
    spec = MergeSpec.model_validate({
        "method": "adamerging", "base_model": str(prepared / "base"),
        "models": [{"model": str(prepared / "experts" / t), "name": t,
                    "data": str(prepared / "data" / t / "unlabeled.jsonl")} for t in tasks],
        "parameters": {"granularity": "layer", "steps": args.steps, "batch_size": args.batch_size,
                       "max_length": args.max_length}})
    steps: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = run_merge(spec, Path(out) / "merged", lambda p: p.metrics and steps.append(p.metrics["step_s"]),
                           device=args.device)
    return {"step_s": steps[args.warmup:], "total_s": time.perf_counter() - started,
            "adapt_s": result.manifest["timings"]["adapt_s"], "peak_mb": peak_memory_mb(args.device)}


def run_fusionbench(prepared: Path, args: argparse.Namespace) -> dict:
    import torch
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    from benchmarks.quality.splits import read_jsonl

    device = torch.device(args.device)
    tasks = tasks_of(prepared)
    started = time.perf_counter()
    experts = [BertForSequenceClassification.from_pretrained(prepared / "experts" / t).eval() for t in tasks]
    heads = [e.classifier.to(device).requires_grad_(False) for e in experts]
    base = BertModel.from_pretrained(prepared / "base").eval()
    n_tensors = sum(1 for _ in base.parameters())
    model = LayerWiseMergedModel(get_layer_wise_weights(len(tasks), n_tensors, 0.3), base,
                                 [e.bert for e in experts], strict=False).to(device).eval()
    optimizer = torch.optim.Adam([model.merge_weight], lr=1e-3)
    inputs = []
    for t in tasks:
        tokenizer = AutoTokenizer.from_pretrained(prepared / "experts" / t)
        texts = [row["text"] for row in read_jsonl(prepared / "data" / t / "unlabeled.jsonl")]
        inputs.append((tokenizer, tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]))
    generator = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(ids), generator=generator).tolist() for _, ids in inputs]

    def batch(k: int, step: int) -> dict[str, torch.Tensor]:
        tokenizer, ids = inputs[k]
        picked = [ids[orders[k][(step * args.batch_size + i) % len(ids)]] for i in range(args.batch_size)]
        padded = tokenizer.pad({"input_ids": picked}, return_tensors="pt")
        return {"input_ids": padded["input_ids"].to(device), "attention_mask": padded["attention_mask"].to(device)}

    steps: list[float] = []
    model.merge_weights()
    for step in range(args.steps):
        began = time.perf_counter()
        for k in range(len(tasks)):
            logits = heads[k](model(**batch(k, step)).pooler_output)
            log_p = logits.log_softmax(-1)
            loss = -(log_p.exp() * log_p).sum(-1).mean()
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        model.merge_weights()
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - began)
    return {"step_s": steps[args.warmup:], "total_s": time.perf_counter() - started,
            "adapt_s": time.perf_counter() - started, "peak_mb": peak_memory_mb(args.device)}


SIDES = {"MergeForge": run_mergeforge, "FusionBench": run_fusionbench}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=REPO_ROOT / ".bench" / "quality")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.prepared / "prepared.json").is_file():
        sys.exit(f"{args.prepared} is not prepared: run `python -m benchmarks.quality.prepare` first")
    if args.side:
        print(json.dumps(SIDES[args.side](args.prepared, args)))
        return
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side in SIDES:
            cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
            done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"run {repeat + 1}/{args.repeats} {side}: median step "
                  f"{statistics.median(runs[side][-1]['step_s']):.3f} s", file=sys.stderr, flush=True)
    memory = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB"
    rows = {}
    for side, results in runs.items():
        rows[side] = {"step": statistics.median(s for r in results for s in r["step_s"]),
                      "adapt": statistics.median(r["adapt_s"] for r in results),
                      "peak": statistics.median(r["peak_mb"] for r in results)}
    print(f"AdaMerging layer-wise, 6 tasks x {args.batch_size} inputs x <= {args.max_length} tokens, {args.steps} "
          f"steps, {args.device}, medians of {args.repeats} runs\n")
    print(f"| tool | median step s | steps/s | adaptation s (load + {args.steps} steps) | {memory} |")
    print("|---|---:|---:|---:|---:|")
    for side, row in rows.items():
        print(f"| {side} | {row['step']:.3f} | {1 / row['step']:.2f} | {row['adapt']:.1f} | {row['peak']:.0f} |")
    mf, fb = rows["MergeForge"], rows["FusionBench"]
    print(f"\nFusionBench / MergeForge: step time {fb['step'] / mf['step']:.2f}x, {memory} "
          f"{fb['peak'] / mf['peak']:.2f}x")


if __name__ == "__main__":
    main()
