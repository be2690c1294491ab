"""The KV-transport comparison of scenario sweeps (kv-loss-sweep, incast), from their run
directories, as one results file and a Markdown table for the docs.

    sudo .venv/bin/pdtb run scenarios/kv-loss-sweep.yaml --out runs/kv-loss-sweep-both
    sudo .venv/bin/pdtb run scenarios/incast.yaml --out runs/incast-both
    .venv/bin/python benchmarks/kv_sweep_summary.py runs/kv-loss-sweep-both runs/incast-both

Per sweep point: requests completed, KV handoff time (the prefill node's kv_start..kv_end, model
ms: mean, p50, p99), TTFT, per-transfer KV rate, the SRD packets resent (from kv_end), the
decode node's dropped SRD datagrams by reason (kv_dropped) and the run's fidelity verdict.
Raw results: benchmarks/results/kv_sweep_summary.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.timeline import read_run_timeline  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def point(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    kv = s["kv_transfer"]
    events = read_run_timeline(run)
    ends = [e for e in events if e["event"] == "kv_end" and e.get("ok")]
    dropped: dict[str, int] = {}
    for e in events:
        if e["event"] == "kv_dropped":
            dropped[e["reason"]] = max(dropped.get(e["reason"], 0), int(e["count"]))
    return {"point": run.name, "completed": s["counts"]["completed"], "total": s["counts"]["total"],
            "kv_ms": {k: kv["time_ms"][k] for k in ("mean", "p50", "p99")},
            "ttft_ms": {k: s["ttft_ms"][k] for k in ("p50", "p99")},
            "kv_gbps_p50": kv["achieved_gbps"]["p50"],
            "transports": sorted({e.get("transport", "tcp") for e in ends}),
            "srd_packets": sum(e.get("packets", 0) for e in ends),
            "srd_resent": sum(e.get("retransmitted", 0) for e in ends),
            "srd_dropped_at_receiver": dropped,
            "fidelity": s.get("fidelity", {}).get("verdict")}


def table(points: list[dict[str, Any]]) -> str:
    out = ["| point | completed | KV handoff mean / p50 / p99 (model ms) | TTFT p50 / p99 (ms) | KV Gbit/s p50 "
           "| SRD resent / packets | fidelity |", "|---|---|---|---|---|---|---|"]
    for p in points:
        k, t = p["kv_ms"], p["ttft_ms"]
        srd = f"{p['srd_resent']} / {p['srd_packets']}" if p["srd_packets"] else "-"
        out.append(f"| {p['point']} | {p['completed']}/{p['total']} | {k['mean']:.1f} / {k['p50']:.1f} / "
                   f"{k['p99']:.1f} | {t['p50']:.0f} / {t['p99']:.0f} | {p['kv_gbps_p50']:.0f} | {srd} | "
                   f"{p['fidelity']} |")
    return "\n".join(out)


def main() -> int:
    sweeps = {}
    for d in sys.argv[1:]:
        root = Path(d)
        runs = sorted(p for p in root.iterdir() if (p / "summary.json").exists()) if not (root / "summary.json").exists() \
            else [root]
        sweeps[root.name] = [point(r) for r in runs]
        print(f"### {root.name}\n\n{table(sweeps[root.name])}\n")
    write_results("kv_sweep_summary", sweeps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
