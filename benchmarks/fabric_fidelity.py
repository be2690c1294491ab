"""Fabric fidelity benchmark: configured vs measured goodput, RTT and loss over a grid, and the
highest aggregate emulated rate this host carries within tolerance.

    sudo .venv/bin/python benchmarks/fabric_fidelity.py [--prefix pt] [--out results.json] [--quick]

Emulated values are configured directly (TDF 1, byte scale 1) on a FabricNet of host pairs on one
EFA switch, changed between points with ``set_link``; the tolerances are those of
``pdtb fabric check`` (docs/fidelity.md). Prints Markdown tables (the figures in docs/fidelity.md
come from this script) and optionally writes the raw results as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.check import (GOODPUT_MIN_RATIO, Probe, judge, measure_rtt, measure_tcp,  # noqa: E402
                          measure_udp_loss)
from fabric.fidelity import read_cpu_times  # noqa: E402
from fabric.topology import TopologyConfig  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

RATES_BPS = [10e6, 30e6, 100e6, 300e6, 600e6, 1000e6]
RTTS_S = [1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3]
LOSSES = [0.005, 0.01, 0.02, 0.05]
JITTERS_S = [0.5e-3, 2e-3]
AGGREGATES_BPS = [100e6, 200e6, 300e6, 400e6, 600e6, 800e6, 1000e6, 1200e6]
BASE_RATE_BPS, BASE_RTT_S = 100e6, 10e-3


def bench_topology(pairs: int) -> TopologyConfig:
    """``pairs`` host pairs (h0->h1, h2->h3, ...) on one EFA switch; unshaped frontend."""
    hosts = [f"h{i}" for i in range(2 * pairs)]
    links = [{"name": f"{h}-fe", "a": h, "b": "fe", "class": "frontend"} for h in hosts]
    links += [{"name": f"{h}-efa", "a": h, "b": "efa", "class": "efa", "params": {"bandwidth": "100Mbps"}}
              for h in hosts]
    return TopologyConfig.model_validate({
        "name": "fidelity-bench", "hosts": [{"name": h, "role": "router"} for h in hosts],
        "switches": [{"name": "fe", "network": "frontend"}, {"name": "efa", "network": "efa"}],
        "links": links})


def configure(net: Any, hosts: list[str], rate_bps: float, rtt_s: float, loss: float = 0.0,
              jitter_s: float = 0.0) -> None:
    """Every host link at ``rate_bps`` with a quarter of the round trip (two links per path, both
    directions); loss (and jitter) on the receiving hosts' links only, so a path has it once."""
    for i, h in enumerate(hosts):
        receiver = i % 2 == 1
        net.set_link(f"{h}-efa", bandwidth_bps=rate_bps, latency_s=rtt_s / 4,
                     loss=loss if receiver else 0.0, jitter_s=jitter_s if receiver else 0.0)


def point(net: Any, kind: str, rate_bps: float, rtt_s: float, loss: float, jitter_s: float = 0.0,
          duration_s: float = 2.0) -> dict[str, Any]:
    """Measure h0 -> h1 for one grid point; judged like ``pdtb fabric check``."""
    configure(net, ["h0", "h1"], rate_bps, rtt_s, loss, jitter_s)
    probe = Probe("h0", "h1", "efa", ["h0-efa", "h1-efa"], 1.0, 1.0, rate_bps=rate_bps, rtt_s=rtt_s, loss=loss)
    probe.measured["rtt_s"] = measure_rtt(net, "h0", "h1", "efa")
    if kind == "rate":
        probe.measured["goodput_bps"] = measure_tcp(net, "h0", "h1", "efa", duration_s)
    if kind == "loss":
        probe.measured["loss"], probe.measured["udp_packets"] = measure_udp_loss(
            net, "h0", "h1", "efa", rate_bps, 3.0)
    judge(probe)
    return {"kind": kind, "rate_bps": rate_bps, "rtt_s": rtt_s, "loss": loss, "jitter_s": jitter_s,
            "measured": probe.measured, "verdicts": probe.verdicts}


def aggregate(net: Any, pairs: int, total_bps: float, rtt_s: float, duration_s: float = 3.0) -> dict[str, Any]:
    """``pairs`` concurrent TCP flows, each over its own pair's links at ``total_bps / pairs``:
    within tolerance when every flow gets >= 90 % of its rate."""
    hosts = [f"h{i}" for i in range(2 * pairs)]
    per_flow = total_bps / pairs
    configure(net, hosts, per_flow, rtt_s)
    results: dict[int, float | str] = {}

    def run(i: int) -> None:
        try:
            results[i] = measure_tcp(net, f"h{2 * i}", f"h{2 * i + 1}", "efa", duration_s, port=5400 + i)
        except Exception as exc:  # recorded in the row; the other flows still count
            results[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    goodputs = [results[i] for i in range(pairs)]
    ok = all(isinstance(g, float) and g >= GOODPUT_MIN_RATIO * per_flow for g in goodputs)
    rtt = measure_rtt(net, "h0", "h1", "efa")       # idle again: the setting still holds after the load
    return {"pairs": pairs, "total_bps": total_bps, "per_flow_bps": per_flow, "rtt_s": rtt_s,
            "goodputs_bps": goodputs, "ok": ok, "rtt_after_s": rtt}


def _pct(measured: float | None, configured: float) -> str:
    return "-" if measured is None or not configured else f"{(measured - configured) / configured * 100:+.1f}%"


def tables(res: dict[str, Any]) -> str:
    out = [f"Host: {res['host']}; backend {res['backend']}; {res['date']}; load average at start "
           f"{res['loadavg_at_start'][0]:.1f}, CPUs {res['cpu_busy_mean']:.0%} busy on average during the run "
           f"({res['duration_s']:.0f} s)", ""]
    out += ["| configured rate | RTT | measured goodput | error | verdict |", "|---:|---:|---:|---:|---|"]
    for r in (r for r in res["grid"] if r["kind"] == "rate"):
        g = r["measured"].get("goodput_bps")
        out.append(f"| {r['rate_bps'] / 1e6:g} Mbit/s | {r['rtt_s'] * 1e3:g} ms | {g / 1e6:.1f} Mbit/s | "
                   f"{_pct(g, r['rate_bps'])} | {r['verdicts']['goodput']} |")
    out += ["", "| configured RTT | jitter (receiver link) | rate | measured RTT (mean) | error | verdict |",
            "|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in res["grid"] if r["kind"] in ("rtt", "jitter")):
        m = r["measured"]["rtt_s"]
        out.append(f"| {r['rtt_s'] * 1e3:g} ms | {r['jitter_s'] * 1e3:g} ms | {r['rate_bps'] / 1e6:g} Mbit/s | "
                   f"{m * 1e3:.2f} ms | {_pct(m, r['rtt_s'])} | {r['verdicts']['rtt']} |")
    out += ["", "| configured loss | rate | UDP packets | measured loss | error | verdict |",
            "|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in res["grid"] if r["kind"] == "loss"):
        m = r["measured"]
        out.append(f"| {r['loss'] * 100:g} % | {r['rate_bps'] / 1e6:g} Mbit/s | {m['udp_packets']} | "
                   f"{m['loss'] * 100:.2f} % | {_pct(m['loss'], r['loss'])} | {r['verdicts']['loss']} |")
    out += ["", "| flows | aggregate | per flow | goodputs (Mbit/s) | within tolerance |", "|---:|---:|---:|---|---|"]
    for a in res["aggregate"]:
        gs = ", ".join(f"{g / 1e6:.0f}" if isinstance(g, float) else "error" for g in a["goodputs_bps"])
        out.append(f"| {a['pairs']} | {a['total_bps'] / 1e6:g} Mbit/s | {a['per_flow_bps'] / 1e6:g} Mbit/s | "
                   f"{gs} | {'yes' if a['ok'] else 'no'} |")
    out += ["", f"Highest aggregate emulated rate within tolerance: "
                f"{res['max_aggregate_bps'] / 1e6:g} Mbit/s" if res["max_aggregate_bps"] else
            "No aggregate rate within tolerance."]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default="pt", help="name prefix of the namespaces and interfaces (default pt)")
    ap.add_argument("--impairment", default="auto", choices=("auto", "netem", "fallback"))
    ap.add_argument("--out", type=Path, help="raw results JSON (default benchmarks/results/fabric_fidelity.json)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (for a smoke test)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (network namespaces)", file=sys.stderr)
        return 2
    from fabric.net import FabricNet

    rates, rtts, losses = (RATES_BPS[::2], RTTS_S[::2], LOSSES[:2]) if args.quick else (RATES_BPS, RTTS_S, LOSSES)
    aggregates = AGGREGATES_BPS[::2] if args.quick else AGGREGATES_BPS
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    res: dict[str, Any] = {"host": f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}",
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "grid": [], "aggregate": []}
    started = time.monotonic()
    res["loadavg_at_start"] = os.getloadavg()
    cpu_start = read_cpu_times()
    net = FabricNet(bench_topology(4), tdf=1.0, byte_scale=1.0, prefix=args.prefix, impairment=args.impairment)
    try:
        net.start()
        res["backend"] = net.impairment_backend
        for rate in rates:
            res["grid"].append(point(net, "rate", rate, BASE_RTT_S, 0.0))
        for rtt in rtts:
            res["grid"].append(point(net, "rtt", BASE_RATE_BPS, rtt, 0.0))
        for jit in JITTERS_S:
            res["grid"].append(point(net, "jitter", BASE_RATE_BPS, BASE_RTT_S, 0.0, jit))
        for loss in losses:
            res["grid"].append(point(net, "loss", BASE_RATE_BPS, BASE_RTT_S, loss))
        for pairs in (2, 4):
            for total in aggregates:
                row = aggregate(net, pairs, total, BASE_RTT_S)
                res["aggregate"].append(row)
                if not row["ok"]:
                    break
    finally:
        net.stop()
    pairs_cpu = list(zip(cpu_start, read_cpu_times()))
    res["cpu_busy_mean"] = (sum(b[0] - a[0] for a, b in pairs_cpu) / max(1, sum(b[1] - a[1] for a, b in pairs_cpu)))
    ok_totals = [a["total_bps"] for a in res["aggregate"] if a["ok"]]
    res["max_aggregate_bps"] = max(ok_totals) if ok_totals else None
    res["duration_s"] = time.monotonic() - started
    print(tables(res))
    write_results("fabric_fidelity", res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
