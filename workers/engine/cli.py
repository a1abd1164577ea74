"""`mergeforge` command line: `merge SPEC OUT_DIR`, `methods`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from workers.engine.errors import EngineError


def _merge(args: argparse.Namespace) -> int:
    from workers.engine.merge import Progress, run_merge
    from workers.engine.spec import load_spec

    try:
        spec = load_spec(args.spec)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        print(f"error: invalid SPEC {args.spec}:\n{_spec_error(exc)}", file=sys.stderr)
        return 2
    bar = None
    show = sys.stderr.isatty() and not args.quiet
    if show:
        from tqdm import tqdm

        bar = tqdm(total=1000, unit="‰", bar_format="{desc:<12} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def on_progress(p: Progress) -> None:
        if bar is not None:
            bar.set_description_str(p.stage, refresh=False)
            bar.update(int(p.fraction * 1000) - bar.n)

    try:
        result = run_merge(spec, Path(args.out_dir), on_progress, device=args.device)
    except EngineError as exc:
        print(f"error [{exc.code.value}]: {exc.message}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    timings = result.manifest["timings"]
    print(f"merged {len(spec.models)} model(s) with {spec.method} into {result.out_dir} "
          f"in {timings['total_s']:.1f} s")
    return 0


def _spec_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(spec)'}: {e['msg']}" for e in exc.errors())
    return f"  {exc}"


def _methods(args: argparse.Namespace) -> int:
    from workers.engine.methods import all_methods

    described = [m.describe() for m in all_methods().values()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for d in described:
        print(f"{d['name']}: {d['summary']}")
        print(json.dumps(d["parameters"], indent=2))
        print()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser("merge", help="merge the checkpoints a SPEC (YAML or JSON) names into OUT_DIR")
    merge.add_argument("spec", type=Path)
    merge.add_argument("out_dir", type=Path)
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    merge.set_defaults(run=_merge)
    methods = sub.add_parser("methods", help="list merge methods with their parameter JSON schema")
    methods.add_argument("--json", action="store_true", help="one JSON document")
    methods.set_defaults(run=_methods)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergeforge", description="Merge fine-tuned checkpoints of one base model.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
