"""How far the sim backend agrees with the emulation, scenario by scenario (same files, same seed).

    sudo .venv/bin/python benchmarks/sim_vs_emulation.py [--backend mininet|local] [SCENARIO ...]

Runs each scenario on the sim backend and on the emulation, and prints TTFT, TPOT, ITL and E2E
p50/p90/p99, KV handoff p50 and goodput of both with their ratio (sim / emulation). The raw
numbers go to benchmarks/results/sim_vs_emulation.json (docs/simulation.md cites them).
Default: scenarios/quickstart.yaml and scenarios/gpu-baseline.yaml, emulated on Mininet.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = [("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p90"),
        ("itl_ms", "p50"), ("itl_ms", "p90"), ("e2e_ms", "p50"), ("e2e_ms", "p90"), ("e2e_ms", "p99")]


def run(scenario: Path, backend: str, out: Path) -> dict:
    import contextlib
    import io

    from testbed.cli import main

    with contextlib.redirect_stdout(io.StringIO()):  # the run's own table: not this script's
        rc = main(["run", str(scenario), "--backend", backend, "--out", str(out), "--no-progress", "--json"])
    if rc != 0:
        raise SystemExit(f"{scenario} on {backend} failed (exit {rc})")
    return json.loads((out / "summary.json").read_text())


def value(summary: dict, metric: str, pct: str) -> float | None:
    if metric == "kv_ms":
        return ((summary.get("kv_transfer") or {}).get("time_ms") or {}).get(pct)
    if metric == "goodput":
        return (summary.get("goodput") or {}).get("share")
    return (summary.get(metric) or {}).get(pct)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", type=Path,
                    default=[REPO / "scenarios" / "quickstart.yaml", REPO / "scenarios" / "gpu-baseline.yaml"])
    ap.add_argument("--backend", default="mininet", choices=["mininet", "local"])
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for sc in args.scenarios:
            t0 = time.time()
            sim = run(sc, "sim", Path(tmp) / f"{sc.stem}-sim")
            t_sim = time.time() - t0
            t0 = time.time()
            emu = run(sc, args.backend, Path(tmp) / f"{sc.stem}-{args.backend}")
            t_emu = time.time() - t0
            rows = []
            for metric, pct in ROWS + [("kv_ms", "p50"), ("goodput", "share")]:
                s, e = value(sim, metric, pct), value(emu, metric, pct)
                rows.append({"metric": f"{metric} {pct}", "sim": s, "emulation": e,
                             "ratio": s / e if s is not None and e else None})
            results.append({"scenario": sc.stem, "backend": args.backend, "sim_wall_s": t_sim, "emu_wall_s": t_emu,
                            "emulation_verdict": emu["fidelity"]["verdict"], "rows": rows})
            print(f"\n{sc.stem}: sim {t_sim:.1f} s wall, {args.backend} {t_emu:.1f} s wall "
                  f"(fidelity {emu['fidelity']['verdict']})")
            print(f"{'metric':18s} {'sim':>10s} {'emulation':>10s} {'ratio':>7s}")
            for r in rows:
                fmt = lambda v: "-" if v is None else f"{v:10.3f}"  # noqa: E731
                print(f"{r['metric']:18s} {fmt(r['sim'])} {fmt(r['emulation'])} "
                      f"{'-' if r['ratio'] is None else format(r['ratio'], '7.3f')}")
    write_results("sim_vs_emulation", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
