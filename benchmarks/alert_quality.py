"""Alert quality: a labelled benchmark of healthy and failing small CPU training runs, scored by replay.

    python benchmarks/alert_quality.py --out out/alert_suite            # train what is missing, then score
    python benchmarks/alert_quality.py --out out/alert_suite --score    # score the cached runs only
    python benchmarks/alert_quality.py --quick --out out/alert_quick    # CI mode: 5 short runs, assertions
    python benchmarks/alert_quality.py --replay out/demo/weibull.sqlite  # any RunStore through both rule sets
    python benchmarks/alert_quality.py --demo-check --out out/demo_check # the demo's recipe with the probe
    python benchmarks/alert_quality.py --demo-variants --out out/demo_variants  # the demo's model at 6 recipes

Every run is cached under ``--out/<run name>/`` (``store.sqlite`` written by the monitor with ``rules=[]``, and
``signals.json`` with the ground-truth signals); scoring rebuilds the snapshots from the stores and feeds them
through each rule set, so rules can be changed and re-scored without retraining. Definitions: docs/alerts.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.alert_suite`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.alert_suite import runs as runs_module
from benchmarks.alert_suite.train import is_cached, train


def _log(text: str) -> None:
    print(text, flush=True)


def train_missing(specs: list[runs_module.RunSpec], out: Path, threads: int, retrain: bool = False) -> None:
    todo = [s for s in specs if retrain or not is_cached(out, s)]
    todo.sort(key=lambda s: s.split != "calibration")  # calibration first: rules are designed on it
    _log(f"{len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to train (threads={threads})")
    for i, spec in enumerate(todo, 1):
        started = time.perf_counter()
        train(spec, out, threads=threads)
        _log(f"[{i}/{len(todo)}] {spec.name}: {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/alert_suite"))
    parser.add_argument(
        "--quick", action="store_true", help="the CI suite (a handful of short runs) + assertions"
    )
    parser.add_argument("--score", action="store_true", help="score cached runs only (train nothing)")
    parser.add_argument("--train-only", action="store_true", help="train missing runs, do not score")
    parser.add_argument("--retrain", action="store_true", help="retrain runs even when cached")
    parser.add_argument("--only", default="*", help="glob on run names to train / score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--replay", nargs="+", type=Path, metavar="STORE", help="replay RunStore files and exit"
    )
    parser.add_argument(
        "--demo-check", action="store_true", help="train the demo's recipe with the probe, score it"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="--demo-check: optimizer steps (default: the demo's)"
    )
    parser.add_argument(
        "--demo-variants", action="store_true", help="train the demo's model at 6 recipes, print their health"
    )
    args = parser.parse_args(argv)
    if args.demo_check:
        from benchmarks.alert_suite.report import demo_check

        return demo_check(args.out, args.steps)
    if args.replay:
        from benchmarks.alert_suite.report import replay_stores

        return replay_stores(args.replay)
    if args.demo_variants:
        from benchmarks.alert_suite.report import demo_variants_report

        specs = runs_module.demo_variants()
        train_missing(specs, args.out, args.threads, args.retrain)
        return demo_variants_report(specs, args.out)
    specs = runs_module.quick_suite() if args.quick else runs_module.full_suite()
    specs = [s for s in specs if fnmatch.fnmatchcase(s.name, args.only)]
    if not args.score:
        train_missing(specs, args.out, args.threads, args.retrain)
    if args.train_only:
        return 0
    from benchmarks.alert_suite.report import run_report

    return run_report(specs, args.out, quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
