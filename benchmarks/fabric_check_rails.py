"""Every rail of the shipped ``pair`` and ``pod`` topologies through ``pdtb fabric check``.

    sudo .venv/bin/python benchmarks/fabric_check_rails.py [--prefix pt] [--topology pair ...]

Runs :func:`fabric.check.check_topology` (automatic TDF and byte scale, host capacity measured
afresh) on each topology and writes the raw reports with their provenance to
``benchmarks/results/fabric_check_rails.json`` (docs/fidelity.md cites it): per probe the rail
pair, configured and measured goodput, RTT and loss, and the verdicts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.check import check_topology  # noqa: E402
from fabric.topology import load_topology  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def summary(report: dict[str, Any]) -> str:
    """One line per network: probes, verdicts and the goodput/RTT error range."""
    lines = [f"{report['topology']}: {'OK' if report['ok'] else 'FAIL'}, {len(report['probes'])} probes in "
             f"{report['duration_s']:.0f} s, tdf {report['tdf']:.4g}, byte scale {report['byte_scale']:.4g}"]
    for net in ("efa", "frontend"):
        ps = [p for p in report["probes"] if p["cls"] == net]
        good = [p["measured"]["goodput_bps"] / p["rate_bps"] - 1 for p in ps
                if p["rate_bps"] and p["measured"].get("goodput_bps")]
        rtt = [p["measured"]["rtt_s"] / p["rtt_s"] - 1 for p in ps if p["rtt_s"] and p["measured"].get("rtt_s")]
        if ps:
            lines.append(f"  {net}: {len(ps)} probes, {sum(p['ok'] for p in ps)} pass; goodput "
                         f"{min(good) * 100:+.0f}..{max(good) * 100:+.0f} %, RTT {min(rtt) * 100:+.0f}.."
                         f"{max(rtt) * 100:+.0f} %")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="pt")
    ap.add_argument("--topology", nargs="+", default=["pair", "pod"])
    args = ap.parse_args()
    reports = []
    for name in args.topology:
        report = check_topology(load_topology(name), prefix=args.prefix)
        print(summary(report))
        reports.append(report)
    write_results("fabric_check_rails", reports)
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
