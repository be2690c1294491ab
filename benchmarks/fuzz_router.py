"""A longer fuzz of the router's OpenAI front end and the nodes' internal API than CI runs.

    .venv/bin/python benchmarks/fuzz_router.py [--examples 5000]

Runs tests/test_hostile.py with PDTB_FUZZ_EXAMPLES examples per property (CI: 120) and prints
how many bodies each property sent and how long it took; a failure prints the smallest body
hypothesis found that breaks the property. Results go to benchmarks/results/fuzz_router.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000, help="examples per property (default 5000)")
    args = ap.parse_args()
    env = {**os.environ, "PDTB_FUZZ_EXAMPLES": str(args.examples)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "3600",
                           "--hypothesis-show-statistics", "tests/test_hostile.py"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    stats = re.findall(r"tests/test_hostile.py::(\w+):\n(?:.*\n)*?\s+- (\d+) passing", proc.stdout)
    rows = [{"property": name, "passing_examples": int(n)} for name, n in stats]
    print(f"{'property':55s} {'examples':>9s}")
    for r in rows:
        print(f"{r['property']:55s} {r['passing_examples']:9d}")
    print(f"wall {wall:.1f} s; pytest exit {proc.returncode}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
    write_results("fuzz_router", {"examples": args.examples, "wall_s": wall, "exit": proc.returncode, "rows": rows})
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
