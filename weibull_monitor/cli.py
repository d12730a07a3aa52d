"""The ``weibull-monitor`` command: ``scan`` saved checkpoints, ``report`` a run store, run the ``demo``, check the
``roles`` of every architecture against its forward pass.

Errors a user can fix (a missing file, a checkpoint that needs pickle, a malformed file, a missing optional package)
end the command with a one-line message (control characters escaped) and exit status 2, never a traceback; so does
anything unexpected, worded as a bug (``WEIBULL_MONITOR_DEBUG=1`` shows its traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from weibull_monitor._version import __version__

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weibull-monitor",
        description="Weibull shape/scale diagnostics of transformer weight matrices.",
    )
    parser.add_argument("--version", action="version", version=f"weibull-monitor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    scan = commands.add_parser(
        "scan",
        help="fit every weight matrix of saved checkpoints",
        description=(
            "Fit the Weibull shape k and scale of every weight matrix in PATH: a .safetensors file, a sharded "
            "*.index.json, a Hugging Face model directory, a directory of checkpoint-*/step* subdirectories (a "
            "series ordered by step), a Lightning .ckpt, a PyTorch .pt/.bin (weights only, never pickle code) or a "
            "GGUF file. Prints summary tables beside the paper's expectations unless --json or --csv is given."
        ),
    )
    scan.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint file, model directory or series directory"
    )
    output = scan.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON list of per-matrix rows")
    output.add_argument("--csv", action="store_true", help="print per-matrix rows as CSV")
    scan.add_argument(
        "--method",
        choices=("histogram", "exact"),
        default="histogram",
        help="histogram: bf16-code histogram (fast, default); exact: full sort",
    )
    scan.add_argument(
        "--store", metavar="FILE", help="also write the fits into this SQLite run store (for `report`)"
    )
    scan.add_argument(
        "--run-name", metavar="NAME", help="run name in the store (default: scan:<resolved PATH>)"
    )
    scan.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read through symlinks that leave the checkpoint directory (e.g. a Hugging Face cache snapshot)",
    )
    scan.add_argument("--no-progress", action="store_true", help="never draw the progress bar")

    report = commands.add_parser(
        "report",
        help="draw figures and an HTML page from a run store",
        description="Write PNG figures and one HTML page (index.html) from a run store written by a run or a scan.",
    )
    report.add_argument("store", metavar="STORE", help="SQLite run store")
    report.add_argument(
        "-o", "--out", metavar="DIR", default=None, help="output directory (default: <STORE>_report)"
    )
    report.add_argument("--run", metavar="NAME_OR_ID", default=None, help="which run (default: every run)")
    report.add_argument(
        "--no-branches",
        action="store_true",
        help="do not draw abandoned (superseded) branches faintly beside the live timeline",
    )

    demo = commands.add_parser(
        "demo",
        help="train a tiny LLaMA on the standard library's source and show the monitor at work",
        description=(
            "Train a tiny LLaMA-style model on CPU, byte-level, on the Python standard library's own source (no "
            "download) through the Hugging Face Trainer with the Weibull callback; log to offline W&B, TensorBoard "
            "and a run store; then write the report and print where everything is."
        ),
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the full demo, ~3 min)"
    )
    demo.add_argument(
        "--out", metavar="DIR", default="weibull-demo", help="output directory (default: weibull-demo)"
    )
    demo.add_argument("--every", type=int, default=None, help="observe every N steps (default: steps / 30)")
    demo.add_argument("--seed", type=int, default=0)

    roles = commands.add_parser(
        "roles",
        help="check the role map against each architecture's own forward pass",
        description=(
            "Build model types of the installed transformers tiny and random, map their roles, and check every role "
            "and fused-parameter split against the model's own forward pass (the layout probe). --sweep does every "
            "causal-LM type plus the encoder families docs/roles.md lists and prints the coverage table."
        ),
    )
    roles.add_argument("--sweep", action="store_true", help="every model type (about 2 minutes on 2 cores)")
    roles.add_argument("--types", metavar="A,B", default=None, help="only these model types (comma-separated)")
    roles.add_argument(
        "--discover",
        action="store_true",
        help="also try every candidate layout on every fused parameter and list the ones the probe verifies",
    )
    roles.add_argument("--json", metavar="FILE", default=None, help="also write the per-family results as JSON")

    from weibull_monitor.demos import study

    study.build_parser(
        commands.add_parser(
            "study",
            help="reproduce the paper's scale dynamics on a CPU: several (lr, wd) settings into one store",
            description=(
                "Train one small model from one seed at several AdamW (lr, weight decay) settings with the "
                "monitor attached; terminal lambda against sqrt(lr/wd), growth and k against T/tau."
            ),
        )
    )
    return parser


class PartialScan(Exception):
    """A later PATH of a multi-PATH scan failed after earlier ones were scanned (and maybe stored)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _scan(args: argparse.Namespace) -> int:
    from weibull_monitor.offline import scan as scanning
    from weibull_monitor.offline import tables
    from weibull_monitor.offline.text import printable

    progress = False if args.no_progress else None
    all_results = []
    failure: BaseException | None = None
    for path in args.paths:
        try:
            results = scanning.scan_path(
                path, method=args.method, follow_symlinks=args.follow_symlinks, progress=progress
            )
            if args.store:
                run_name = args.run_name if len(args.paths) == 1 else None
                run_id = scanning.write_store(results, args.store, source=path, run_name=run_name)
                print(
                    f"stored {len(results)} snapshot(s) of {printable(path)} in {printable(args.store)} "
                    f"(run {run_id})",
                    file=sys.stderr,
                )
        except Exception as error:  # what was scanned (and stored) before is still printed
            if not all_results:
                raise
            failure = error
            break
        all_results.append(results)
    flat = [r for results in all_results for r in results]
    if args.json:
        tables.write_json(flat, sys.stdout)
    elif args.csv:
        tables.write_csv(flat, sys.stdout)
    else:
        print("\n\n".join(tables.format_tables(results) for results in all_results))
    if failure is not None:
        sys.stdout.flush()
        raise PartialScan(failure)
    return 0


def _report(args: argparse.Namespace) -> int:
    from weibull_monitor.offline.report import write_report
    from weibull_monitor.offline.text import printable

    store = Path(args.store)
    out = Path(args.out) if args.out else store.with_name(store.stem + "_report")
    page = write_report(store, out, run=args.run, branches=not args.no_branches)
    print(f"report: {printable(page)}")
    print(f"open it with: python -m webbrowser {printable(page.resolve().as_uri())}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from weibull_monitor.demos.demo import run_demo

    run_demo(steps=args.steps, out=Path(args.out), every=args.every, seed=args.seed)
    return 0


def _roles(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from weibull_monitor.models.sweep import run

    if not args.sweep and not args.types:
        raise ImportError("roles: pass --sweep (every model type) or --types A,B")
    families = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None

    def progress(result: run.FamilyResult) -> None:
        state = "built" if result.built else "not built"
        print(f"  {result.model_type}: {state}, {result.seconds:.1f}s", file=sys.stderr, flush=True)

    results = run.run_sweep(families, progress=progress, discover=args.discover)
    print(run.coverage_table(results))
    if args.discover:
        print("\n" + run.discovered_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0


def _study(args: argparse.Namespace) -> int:
    from weibull_monitor.demos.study import run_from_args

    return run_from_args(args)


class _Warnings:
    """Warnings as one escaped line each; past ``limit`` lines they are counted and summarised at the end, so a
    series of a thousand broken checkpoints gives a screen, not a flood."""

    def __init__(self, command: str, limit: int = 20) -> None:
        self.command = command
        self.limit = limit
        self.shown = 0
        self.held = 0

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        from weibull_monitor.offline.text import printable

        if self.shown >= self.limit:
            self.held += 1
            return
        self.shown += 1
        print(f"weibull-monitor {self.command}: warning: {printable(message)}", file=sys.stderr)

    def summary(self) -> None:
        if self.held:
            print(
                f"weibull-monitor {self.command}: warning: {self.held} more warnings not shown",
                file=sys.stderr,
            )


def _error_line(command: str, error: BaseException) -> str:
    """The one line an error ends the command with (control characters escaped, newlines included)."""
    import sqlite3

    from weibull_monitor.offline.text import printable

    if isinstance(error, PartialScan):
        return _error_line(command, error.error) + " (the PATHs before it were scanned and printed)"
    if isinstance(error, sqlite3.Error):
        text = f"the store cannot be used: {error}"
    elif isinstance(error, RecursionError):
        text = "input nested too deeply to read"
    elif isinstance(error, MemoryError):
        text = "not enough memory for this input"
    elif isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror}"
    elif _expected(error):
        text = str(error)
    else:
        text = f"unexpected {type(error).__name__}: {error} (a bug in weibull-monitor; WEIBULL_MONITOR_DEBUG=1 shows where)"
    return f"weibull-monitor {command}: error: {printable(text)}"


def _expected(error: BaseException) -> bool:
    """Errors whose message is meant for the user as it is."""
    if isinstance(error, (FileNotFoundError, ImportError)):
        return True
    try:
        from weibull_monitor.offline.report.data import ReportError
        from weibull_monitor.offline.sources import LoaderError
        from weibull_monitor.store import StoreError
    except ImportError:  # pragma: no cover - a broken install: worded as unexpected
        return False
    return isinstance(error, (LoaderError, ReportError, StoreError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"scan": _scan, "report": _report, "demo": _demo, "study": _study, "roles": _roles}
    flood = _Warnings(args.command)
    try:
        with warnings.catch_warnings():
            if args.command != "demo":  # the demo's libraries keep their own warning format
                warnings.showwarning = flood.show
            return handlers[args.command](args)
    except BrokenPipeError:  # `scan ... | head`: the reader left, nothing to report
        return 0
    except KeyboardInterrupt:
        print(f"weibull-monitor {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, never a traceback (WEIBULL_MONITOR_DEBUG=1 re-raises)
        if os.environ.get("WEIBULL_MONITOR_DEBUG") and not isinstance(error, PartialScan):
            raise
        print(_error_line(args.command, error), file=sys.stderr)
        return EXIT_USAGE
    finally:
        flood.summary()


if __name__ == "__main__":
    sys.exit(main())
