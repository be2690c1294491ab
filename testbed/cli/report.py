"""``pdtb report RUN_DIR``: (re)write a run's or a sweep's report.html and PNGs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.html and PNG plots for a run (or a sweep) directory")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    p.add_argument("--recompute", action="store_true", help="recompute summary.json from the timeline first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # matplotlib and numpy are imported here, not at load: every `pdtb` start loads this module
    from testbed.metrics import compute_summary
    from testbed.report import is_sweep_dir, write_report, write_sweep_report

    d: Path = args.run_dir
    if not d.is_dir():
        print(f"error: {d}: not a directory", file=sys.stderr)
        return 2
    if is_sweep_dir(d):
        if args.recompute:
            for run_json in sorted(d.glob("*/run.json")):
                compute_summary(run_json.parent)
        print(write_sweep_report(d))
        return 0
    if (d / "timeline").is_dir() or (d / "run.json").exists():
        if args.recompute or not (d / "summary.json").exists():
            compute_summary(d)
        print(write_report(d))
        return 0
    print(f"error: {d}: neither a run directory (timeline/, run.json) nor a sweep directory (*/run.json with "
          "a sweep_point)", file=sys.stderr)
    return 2
