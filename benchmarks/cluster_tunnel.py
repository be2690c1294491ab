"""Cross-server tunnel benchmark for the mininet-cluster backend (docs/cluster.md): the capacity
of a shaped, tunnelled link next to this host's shaped-veth capacity, and the quickstart with
decode0 and client0 on the second server next to the same scenario on one machine.

    sudo .venv/bin/python benchmarks/cluster_tunnel.py [--scenario FILE] [--skip-runs] [--prefix pk]

Without ``--scenario`` the second server is a ``LoopbackServer`` (an sshd on a free port of
127.0.0.2 with its own keys, on this machine); with one, its ``emulation.cluster`` servers are
measured. Writes benchmarks/results/cluster_tunnel.json (docs/cluster.md cites it).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.dilation import measure_host_capacity  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from testbed.config.scenario import load_scenario  # noqa: E402
from testbed.runner.cluster import LoopbackServer, measure_tunnel_capacity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")


def run_quickstart(out: Path, prefix: str, sets: list[str]) -> dict[str, Any]:
    """``pdtb run`` of the quickstart with ``--set`` items; its summary's p50s, fidelity and wall time."""
    argv = [sys.executable, "-m", "testbed.cli", "run", str(QUICKSTART), "--out", str(out), "--json",
            "--prefix", prefix, "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"pdtb run failed: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    fidelity = json.loads((out / "fidelity.json").read_text())
    return {"wall_s": time.monotonic() - t0, "completed": summary["counts"]["completed"],
            **{f"{m}_p50": summary[m]["p50"] for m in METRICS},
            "kv_p50_ms": summary["kv_transfer"]["time_ms"]["p50"],
            "fidelity": fidelity["verdict"], "fidelity_reasons": fidelity.get("reasons", [])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", help="a scenario whose emulation.cluster names the servers")
    ap.add_argument("--prefix", default="pk")
    ap.add_argument("--skip-runs", action="store_true", help="measure the capacities only")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pdtb-cluster-bench-") as tmp:
        server = None
        try:
            if args.scenario:
                cluster = load_scenario(args.scenario).emulation.cluster
                if cluster is None:
                    ap.error(f"{args.scenario} has no emulation.cluster")
            else:
                server = LoopbackServer(Path(tmp) / "sshd").start()
                cluster = server.cluster()
            results["host_capacity_bps"] = measure_host_capacity(args.prefix, use_cache=False)
            results["tunnel_capacity_bps"] = measure_tunnel_capacity(cluster, args.prefix, use_cache=False)
            results["tunnel"] = cluster.tunnel
            print(f"host (shaped veth): {results['host_capacity_bps'] / 1e6:.0f} Mbit/s")
            for name, bps in results["tunnel_capacity_bps"].items():
                print(f"{cluster.tunnel} tunnel to {name}: {bps / 1e6:.0f} Mbit/s")
            if not args.skip_runs:
                remote = cluster.servers[1]
                one = run_quickstart(Path(tmp) / "one", args.prefix, ["emulation.backend=mininet"])
                spread = [f"emulation.backend=mininet-cluster",
                          f"emulation.cluster={json.dumps(cluster.model_dump(mode='json', exclude_none=True) | {'placement': {'decode0': remote, 'client0': remote}})}"]
                two = run_quickstart(Path(tmp) / "two", args.prefix, spread)
                results["quickstart"] = {"one_machine": one, "decode0_client0_remote": two}
                print("| quickstart | " + " | ".join(f"{m} p50" for m in METRICS) + " | KV p50 ms | fidelity | wall s |")
                print("|---" * (len(METRICS) + 4) + "|")
                for label, r in (("one machine", one), (f"decode0, client0 on {remote}", two)):
                    print(f"| {label} | " + " | ".join(f"{r[f'{m}_p50']:.3f}" for m in METRICS)
                          + f" | {r['kv_p50_ms']:.1f} | {r['fidelity']} | {r['wall_s']:.0f} |")
        finally:
            if server is not None:
                server.stop()
    write_results("cluster_tunnel", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
