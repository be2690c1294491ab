"""How fast the sim backend runs: simulated model seconds per wall second and peak memory.

    .venv/bin/python benchmarks/sim_scale.py [--requests 1000 10000] [--nodes 8 64] [--trace-nodes 512]
        [--scenario scenarios/cluster-trace.yaml] [--append]

For each (requests, nodes): half the nodes trn2 prefill, half CS-3 decode, on one EFA switch;
Llama-3.1-8B, Poisson arrivals at 4 requests per model second per decode node, 1-2k-token
prompts, 64-256 output tokens. ``--trace-nodes N``: the shared Azure code trace (57 minutes,
its native rate) on the same N-node topology, serving Llama-3.3-70B as
scenarios/cluster-trace.yaml does. ``--scenario``: a shipped scenario on the sim backend.
Prints a table and writes benchmarks/results/sim_scale.json (``--append``: adds to its rows).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results_file import RESULTS_DIR, write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "traces" / "azure_llm_2023_code.csv"  # as scenarios/cluster-trace.yaml finds it


def topology(n: int) -> str:
    half = max(1, n // 2)
    hosts = [f"  - {{name: p{i}, role: prefill, hardware: trn2}}" for i in range(half)]
    hosts += [f"  - {{name: d{i}, role: decode, hardware: cs3}}" for i in range(n - half)]
    links = [f"  - {{name: p{i}-efa, a: p{i}, b: efa, class: efa, params: {{bandwidth: 3.2Tbps, latency: 7.5us}}}}"
             for i in range(half)]
    links += [f"  - {{name: d{i}-efa, a: d{i}, b: efa, class: efa, params: {{bandwidth: 1.2Tbps, latency: 7.5us}}}}"
              for i in range(n - half)]
    names = [f"p{i}" for i in range(half)] + [f"d{i}" for i in range(n - half)] + ["router", "client0"]
    links += [f"  - {{name: {h}-fe, a: {h}, b: fe, class: frontend, params: {{bandwidth: 100Gbps, latency: 25us}}}}"
              for h in names]
    return ("kind: topology\nname: scale\nhosts:\n" + "\n".join(hosts) + "\n  - {name: router, role: router}\n"
            "  - {name: client0, role: client}\nswitches:\n  - {name: efa, network: efa}\n  - {name: fe, network: frontend}\n"
            "links:\n" + "\n".join(links) + "\n")


def scenario(requests: int, n: int) -> str:
    rate = 4.0 * max(1, n - n // 2)
    return (f"kind: scenario\nname: scale\ntopology: topo.yaml\nmodel: llama-3.1-8b\nkv_transfer: {{mode: layerwise}}\n"
            f"workload:\n  arrival: {{process: poisson, rate: {rate}}}\n  requests: {requests}\n"
            f"  prompt_tokens: {{dist: uniform, min: 1024, max: 2048}}\n"
            f"  output_tokens: {{dist: uniform, min: 64, max: 256}}\n  seed: 1\n")


def trace_scenario(trace: Path) -> str:
    """The whole Azure code trace at its own rate, as scenarios/cluster-trace.yaml serves it."""
    return (f"kind: scenario\nname: scale-trace\ntopology: topo.yaml\nmodel: llama-3.3-70b\n"
            f"router: {{prefill_policy: least_loaded, decode_policy: kv_aware}}\nkv_transfer: {{mode: layerwise}}\n"
            f"workload:\n  trace: {{path: {trace}, speedup: 1}}\n  seed: 7\n")


def measure(scenario_path: Path, out: Path, row: dict) -> dict:
    """One sim run in a child process, so its peak RSS is its own; ``row`` with the figures added."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", (
        "import resource, sys; from testbed.cli import main; "
        f"rc = main(['run', '{scenario_path}', '--backend', 'sim', '--out', '{out}', '--no-progress', "
        "'--json']); print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")],
        cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rss_kib = int(proc.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    return {**row, "requests": summary["counts"]["total"], "wall_s": wall, "sim_wall_s": run.get("sim_wall_s"),
            "model_s": summary["duration_s"], "model_s_per_wall_s": summary["duration_s"] / wall,
            "peak_rss_mib": rss_kib / 1024, "completed": summary["counts"]["completed"],
            "load_avg_1m_after": os.getloadavg()[0]}


def one(requests: int, n: int, scenario_text: str | None = None, label: str = "synthetic") -> dict:
    """A generated scale scenario (or ``scenario_text``) on the n-node topology."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "topo.yaml").write_text(topology(n))
        (d / "s.yaml").write_text(scenario_text or scenario(requests, n))
        return measure(d / "s.yaml", d / "run", {"workload": label, "nodes": n})


def shipped(path: Path) -> dict:
    """A shipped scenario as it is (its own topology and workload)."""
    with tempfile.TemporaryDirectory() as tmp:
        sc = yaml.safe_load(path.read_text())
        topo = yaml.safe_load((REPO / "topologies" / f"{sc['topology']}.yaml").read_text())
        nodes = sum(1 for h in topo["hosts"] if h.get("role") in ("prefill", "decode", "colocated"))
        return measure(path.resolve(), Path(tmp) / "run", {"workload": path.name, "nodes": nodes})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--nodes", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--trace-nodes", type=int, nargs="*", default=[], help="the Azure trace on N-node topologies")
    ap.add_argument("--scenario", type=Path, nargs="*", default=[], help="shipped scenarios to time")
    ap.add_argument("--append", action="store_true", help="add the rows to benchmarks/results/sim_scale.json's")
    args = ap.parse_args()
    rows = [one(r, n) for r in args.requests for n in args.nodes]
    rows += [one(0, n, trace_scenario(TRACE), "azure-code-trace") for n in args.trace_nodes]
    rows += [shipped(p) for p in args.scenario]
    if args.append and (RESULTS_DIR / "sim_scale.json").exists():
        rows = json.loads((RESULTS_DIR / "sim_scale.json").read_text())["results"]["rows"] + rows
    print(f"{'workload':>18s} {'requests':>9s} {'nodes':>6s} {'wall s':>8s} {'model s':>8s} {'model s/wall s':>15s} "
          f"{'peak MiB':>9s}")
    for r in rows:
        print(f"{r['workload']:>18s} {r['requests']:9d} {r['nodes']:6d} {r['wall_s']:8.1f} {r['model_s']:8.1f} "
              f"{r['model_s_per_wall_s']:15.2f} {r['peak_rss_mib']:9.0f}")
    write_results("sim_scale", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
