"""The ``weibull-monitor`` command (scan, report, demo are filled in by the CLI module's work)."""

from __future__ import annotations

import argparse
import sys

from weibull_monitor import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weibull-monitor",
        description="Weibull shape/scale diagnostics of transformer weight matrices.",
    )
    parser.add_argument("--version", action="version", version=f"weibull-monitor {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
