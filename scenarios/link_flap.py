"""A flapping EFA link: take the decode node's EFA link down for a while mid-run and see what
the KV handoffs and TTFT do before, during and after (Mininet backend).

    sudo .venv/bin/python scenarios/link_flap.py [--down-at 2] [--down-for 1] [--link decode0-efa]

Requests whose KV cache has to cross the link while it is down wait for TCP to retransmit
once it is back (or fail when the handoff times out): their TTFT jumps, the others' does not.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median

from nodes.timeline import read_run_timeline
from testbed import Testbed
from testbed.metrics import request_records

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(HERE / "quickstart.yaml"))
    parser.add_argument("--link", default="decode0-efa", help="link to flap (a link name of the topology)")
    parser.add_argument("--down-at", type=float, default=2.0, help="model seconds after the workload starts")
    parser.add_argument("--down-for", type=float, default=1.0, help="model seconds the link stays down")
    parser.add_argument("--prefix", default="pt", help="Mininet name prefix (default pt)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    overrides = ["workload.requests=40", "kv_transfer.mode=whole"]
    with Testbed(args.scenario, overrides=overrides, backend="mininet", out=args.out, prefix=args.prefix) as tb:
        tb.run_workload(wait=False)
        tb.sleep_model(args.down_at)
        down = tb.now_model()  # model seconds since the run's t0, as in the timelines
        tb.set_link(args.link, up=False)
        print(f"{args.link} down at model t={down:.3f} s")
        tb.sleep_model(args.down_for)
        up = tb.now_model()
        tb.set_link(args.link, up=True)
        print(f"{args.link} up at model t={up:.3f} s")
        tb.wait()

    records = request_records(read_run_timeline(tb.run_dir))
    phases = {"before": [], "while down": [], "after": []}
    failed = 0
    for r in records:
        if r["sent_s"] is None:
            continue
        t = r["sent_s"]
        if not r["completed"]:
            failed += 1
            continue
        phase = "before" if t < down else "while down" if t < up else "after"
        phases[phase].append(r["ttft_s"] * 1e3)
    for phase, ttfts in phases.items():
        text = f"TTFT p50 {median(ttfts):.1f} ms, max {max(ttfts):.1f} ms" if ttfts else "no requests"
        print(f"sent {phase:>10}: {len(ttfts):3d} completed; {text}")
    print(f"failed: {failed}; run directory: {tb.run_dir}")


if __name__ == "__main__":
    main()
