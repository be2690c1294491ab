"""``pdtb compare COMPARISON``: run every cell of a comparison and write its table and report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run deployments x models x workloads x loads and compare them "
                                       "(comparison.json, comparison.csv, comparison.html)")
    p.add_argument("comparison", metavar="COMPARISON", help="comparison YAML file (kind: comparison)")
    p.add_argument("--quick", action="store_true", help="run only the file's quick: subset")
    p.add_argument("--backend", default=None, help="override the file's backend (auto, local, mininet, ...)")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="output directory (default runs/<name>-<UTC time>); must be new or empty")
    p.add_argument("--list", action="store_true", help="list the cells and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from testbed.compare import cells, load_comparison, run_comparison
    from testbed.runner.rundir import DEFAULT_BASE, utc_stamp

    cmp = load_comparison(args.comparison)
    todo = cells(cmp, args.quick)
    if args.list:
        for c in todo:
            print(c.label)
        return 0
    out: Path = args.out or DEFAULT_BASE / f"{cmp.config.name}-{utc_stamp()}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(str(out), [("", "output directory exists and is not empty: choose another --out")])
    doc = run_comparison(cmp, out, quick=args.quick, backend=args.backend,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    ok = sum(1 for c in doc["cells"] if c["status"] == "ok")
    print(f"{ok} of {len(doc['cells'])} cells ran; results: {out / 'comparison.csv'}; "
          f"report: {out / 'comparison.html'}")
    return 0 if ok else 1
