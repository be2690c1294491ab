"""Where every benchmark leaves its raw numbers: ``benchmarks/results/<name>.json``, with the date,
the machine and the command line, so docs cite a file and a date instead of numbers copied by
hand (re-running a benchmark regenerates the file the docs point at)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(name: str, results: Any, path: Path | None = None) -> Path:
    """Write ``results`` (JSON-able) with its provenance; returns the file written."""
    out = path or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
              "results": results}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"raw results: {out}", file=sys.stderr)
    return out
