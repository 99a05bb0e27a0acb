"""``excitation-dist report``: PNG plots (loss, expert utilization, multipliers) from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where to write the PNGs (default ./report)")


def run(args: argparse.Namespace) -> int:
    from excitation_dist.recipe.report import make_report

    try:
        written = make_report(args.runs, args.out)
    except FileNotFoundError as exc:
        raise SystemExit(f"excitation-dist report: {exc}") from None
    for path in written:
        print(path)
    return 0
