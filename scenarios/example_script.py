"""Drive a run from Python: bring the system up, replay the workload, change the fabric and a
node half way, read the results.

    sudo .venv/bin/python scenarios/example_script.py                 # Mininet
    .venv/bin/python scenarios/example_script.py --backend local      # loopback, no link changes

The scenario's own settings come from quickstart.yaml; ``overrides`` work like ``--set``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from testbed import Testbed

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(HERE / "quickstart.yaml"))
    parser.add_argument("--backend", choices=["auto", "local", "mininet"], default=None)
    parser.add_argument("--prefix", default="pt", help="Mininet name prefix (default pt)")
    parser.add_argument("--out", default=None, help="run directory (default runs/<scenario>-<time>)")
    args = parser.parse_args()

    with Testbed(args.scenario, overrides=["workload.requests=30"], backend=args.backend, out=args.out,
                 prefix=args.prefix) as tb:
        print(f"router at {tb.router_url} (TDF {tb.tdf:g}, byte scale {tb.byte_scale:g}); nodes {tb.nodes()}")
        tb.run_workload(wait=False)  # replay the workload in the background
        tb.sleep_model(2.0)  # two model seconds in...
        if tb.backend == "mininet":
            changed = tb.set_link("efa", bandwidth_bps=100e9, latency_s=50e-6)  # ...EFA at 100 Gbit/s, 50 us
            print(f"links changed: {changed}")
        decode = next(name for name, role in tb.nodes().items() if role == "decode")
        tb.node_command(decode, "slowdown", factor=2.0)  # ...and the decode node at half speed
        tb.wait()
    s = tb.results()
    c = s["counts"]
    print(f"{c['completed']}/{c['total']} completed; TTFT p50 {_ms(s['ttft_ms']['p50'])}, "
          f"TPOT p50 {_ms(s['tpot_ms']['p50'])} (model time)")
    print(f"run directory: {tb.run_dir}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


if __name__ == "__main__":
    main()
