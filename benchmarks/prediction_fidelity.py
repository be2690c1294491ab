"""Benchmark: at low load, do whole Mininet runs measure the TTFT and TPOT that ``pdtb predict`` says?

Runs a scenario (default the quickstart) on Mininet with requests that run alone (fixed arrivals,
one at a time) at several prompt sizes, ``--repeat`` times each, and prints the run's own
``prediction_check`` (summary.json): measured and predicted medians of the lone requests and
their ratio. The issue's target is a ratio within 0.9 .. 1.1; the test suite asserts only a
loose band, because this shared 2-core host has episodes in which it runs several times slower.

    sudo .venv/bin/python benchmarks/prediction_fidelity.py --prompts 512 1536 4096 --repeat 2 \\
        --out /tmp/prediction_fidelity.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]
TARGET = (0.9, 1.1)


def run_once(scenario: Path, prompt_tokens: int, requests: int, rate: float, prefix: str, out: Path) -> dict[str, Any]:
    """One ``pdtb run`` of ``scenario`` at ``prompt_tokens`` per request; its prediction check."""
    argv = [sys.executable, "-m", "testbed.cli", "run", str(scenario), "--out", str(out), "--json",
            "--prefix", prefix, "--set", f"workload.requests={requests}", "--set", "workload.arrival.process=fixed",
            "--set", f"workload.arrival.rate={rate:g}", "--set", f"workload.prompt_tokens={prompt_tokens}"]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"pdtb run failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    summary = json.loads(proc.stdout)
    check = summary["prediction_check"] or {}
    return {"prompt_tokens": prompt_tokens, "wall_s": time.monotonic() - started, "tdf": summary["emulation"]["tdf"],
            "requests_alone": check.get("requests"), "measured": check.get("measured", {}),
            "predicted": check.get("predicted", {}), "ratio": check.get("ratio", {})}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'prompt':>7} {'alone':>5} {'tdf':>6} {'TTFT ms':>9} {'pred':>9} {'ratio':>6}  "
            f"{'TPOT ms':>8} {'pred':>8} {'ratio':>6}  {'wall s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, p, q = r["measured"], r["predicted"], r["ratio"]
        lines.append(f"{r['prompt_tokens']:>7d} {_f(r['requests_alone'], 'd'):>5} {_f(r['tdf'], '.4g'):>6} "
                     f"{_f(m.get('ttft_ms_p50'), '.2f'):>9} {_f(p.get('ttft_ms'), '.2f'):>9} "
                     f"{_f(q.get('ttft'), '.3f'):>6}  {_f(m.get('tpot_ms_p50'), '.3f'):>8} "
                     f"{_f(p.get('tpot_ms'), '.3f'):>8} {_f(q.get('tpot'), '.3f'):>6}  {r['wall_s']:>6.1f}")
    ratios = [v for r in rows for k in ("ttft", "tpot") if (v := r["ratio"].get(k)) is not None]
    inside = sum(TARGET[0] <= v <= TARGET[1] for v in ratios)
    lines.append(f"{inside} of {len(ratios)} ratios within {TARGET[0]:g} .. {TARGET[1]:g}"
                 + (f"; range {min(ratios):.3f} .. {max(ratios):.3f}" if ratios else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "quickstart.yaml")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 1536, 4096], help="prompt tokens per request")
    ap.add_argument("--requests", type=int, default=4, help="requests per run (each runs alone)")
    ap.add_argument("--rate", type=float, default=2.0, help="fixed arrival rate, requests per model second")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--prefix", default="pt", help="Mininet name prefix of the runs")
    ap.add_argument("--out", type=Path, help="raw results JSON (default benchmarks/results/prediction_fidelity.json)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdtb-predfid-") as tmp:
        for i in range(args.repeat):
            for prompt in args.prompts:
                rows.append(run_once(args.scenario, prompt, args.requests, args.rate, args.prefix,
                                     Path(tmp) / f"run-{prompt}-{i}"))
                print(f"  prompt {prompt}, repeat {i + 1}: ratios {rows[-1]['ratio']}", file=sys.stderr)
    print(format_table(rows))
    write_results("prediction_fidelity", rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
