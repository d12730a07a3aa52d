"""Running a study end to end, and its command line (``weibull-monitor study`` / examples/scaling_study.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from weibull_monitor.demos.study.analysis import StudyResult, analyse_store
from weibull_monitor.demos.study.config import (
    EXIT_USAGE,
    Setting,
    StudyConfig,
    StudyError,
    default_config,
    quick_config,
)
from weibull_monitor.demos.study.figures import write_figures
from weibull_monitor.demos.study.summary import format_summary
from weibull_monitor.demos.study.training import train_setting


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Train every setting of ``config`` into ``<out_dir>/study.sqlite`` (one run per setting), analyse the store,
    write the figures (when matplotlib is there and ``figures``) and return the result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "study.sqlite"
    if store_path.exists():
        if not overwrite:
            raise FileExistsError(
                f"{store_path} exists; pass overwrite=True (--overwrite) to start it afresh"
            )
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    import torch

    seeds = ", ".join(map(str, config.seeds))
    log(
        f"scaling study: {config.arch}, {len(config.settings)} settings x seed{'s' * (len(config.seeds) > 1)} "
        f"{seeds}, each to T/τ = {config.t_over_tau:g}; torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s); store {store_path}"
    )
    training = {}
    for seed in config.seeds:
        for setting in config.settings:
            training[config.run_name(setting, seed)] = train_setting(
                config, setting, store_path, seed=seed, log=log
            )
    result = analyse_store(store_path)
    result.training = training
    if figures:
        write_figures(result, out)
    return result


def _setting_argument(text: str) -> Setting:
    try:
        return Setting.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seeds_argument(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds are integers separated by commas (e.g. 0,1,2), got {text!r}"
        ) from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"seeds are distinct integers >= 0, got {text!r}")
    return seeds


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The study's options (shared by ``examples/scaling_study.py`` and ``weibull-monitor study``)."""
    parser = parser or argparse.ArgumentParser(
        prog="scaling_study", description="Reproduce the paper's scale-dynamics findings on a CPU."
    )
    parser.add_argument("--quick", action="store_true", help="the small CI run (about a minute of CPU)")
    parser.add_argument(
        "--arch",
        choices=("llama", "neox"),
        default="llama",
        help="llama: tiny LLaMA (GQA); neox: GPT-NeoX with fused query_key_value",
    )
    parser.add_argument("--out", metavar="DIR", default="weibull-study", help="output directory")
    parser.add_argument(
        "--setting",
        action="append",
        metavar="LR:WD",
        type=_setting_argument,
        help="an (η, λ_wd) setting, repeatable (replaces the preset's settings)",
    )
    parser.add_argument("--t-over-tau", type=float, default=None, help="train each setting to this T/τ")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots per run (at least)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="train every setting from this one seed")
    seeds.add_argument(
        "--seeds",
        type=_seeds_argument,
        default=None,
        metavar="S,S,...",
        help="train every setting from each of these seeds (the presets: 0,1,2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is too small to share)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <out>/study.sqlite")
    parser.add_argument(
        "--analyse-only", action="store_true", help="train nothing: analyse <out>/study.sqlite again"
    )
    parser.add_argument("--no-figures", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    config = quick_config(args.arch) if args.quick else default_config(args.arch)
    changes: dict[str, Any] = {}
    if args.setting:
        changes["settings"] = tuple(args.setting)
    if args.t_over_tau is not None:
        changes["t_over_tau"] = args.t_over_tau
    if args.snapshots is not None:
        changes["snapshots"] = args.snapshots
    if args.seed is not None:
        changes["seeds"] = (args.seed,)
    if getattr(args, "seeds", None) is not None:
        changes["seeds"] = args.seeds
    return replace(config, **changes) if changes else config


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or re-analyse) the study and print the table; 0 on success, 2 (with a one-line message) when the
    store is missing, already there without ``--overwrite``, or holds too little to analyse."""
    import torch

    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(args.out)
    try:
        if args.analyse_only:
            result = analyse_store(out / "study.sqlite")
            if not args.no_figures:
                write_figures(result, out)
        else:
            torch.set_num_threads(max(1, args.threads))
            config = config_from_args(args)
            result = run_study(config, out, overwrite=args.overwrite, figures=not args.no_figures)
    except (FileNotFoundError, FileExistsError, StudyError) as error:
        print(f"scaling study: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print()
    print(format_summary(result))
    for path in result.figures:
        print(f"figure: {path}")
    print(
        f"store: {result.store}  ({time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU in this process)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))
