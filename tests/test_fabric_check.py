"""``pdtb fabric check topologies/pair.yaml --json`` on this machine's impairment backend.

The check's own tolerance (goodput >= 90 %, RTT +-(10 % + 0.3 ms)) is its verdict, which this
test recomputes from the reported values; the test itself asserts loose bounds on those values,
because a shared CI host goes through episodes of noise that no shaping can hide (the tight
figures are benchmarks/fabric_fidelity.py's and docs/fidelity.md's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.check import Probe, judge
from fabric.topology import load_topology

REPO = Path(__file__).resolve().parent.parent
PREFIX = "pb"
"""A prefix of this test's own, so that its cleanup never touches another run's interfaces."""


@pytest.mark.root
@pytest.mark.timeout(180)
def test_pair_measured_against_configuration():
    argv = [sys.executable, "-m", "testbed.cli", "fabric", "check", str(REPO / "topologies" / "pair.yaml"),
            "--json", "--prefix", PREFIX]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["ok"] == all(p["ok"] for p in report["probes"])
    # every shaped link was measured, and the automatic dilation put each path in the judged ranges
    links = {name for p in report["probes"] for name in p["links"]}
    assert {"client0-fe", "router-fe"} <= links
    # every rail: the trn2's 16 (200 Gbit/s each) and the CS-3's 12 (100 Gbit/s), each its own link
    rails = {lk.name for lk in load_topology("pair").rail_links() if lk.cls == "efa"}
    assert len(rails) == 28 and rails <= links
    assert {(p["src_rail"], p["dst_rail"]) for p in report["probes"] if p["cls"] == "efa"} >= \
        {(k, k) for k in range(12)}
    for p in report["probes"]:
        m = p["measured"]
        assert "errors" not in m, p
        assert p["verdicts"]["goodput"] in ("PASS", "FAIL") and p["verdicts"]["rtt"] in ("PASS", "FAIL"), p
        # the verdicts are the tolerance applied to the reported values
        fields = {k: v for k, v in p.items() if k in Probe.__dataclass_fields__}
        again = Probe(**fields | {"verdicts": {}})
        judge(again)
        assert again.verdicts == p["verdicts"], p
        # loose bounds: HTB never lets TCP past its rate (nor cuts it to a fraction, as a bits vs
        # bytes slip would); the delay is applied, once per direction
        assert 0.25 * p["rate_bps"] <= m["goodput_bps"] <= 1.05 * p["rate_bps"], p
        assert p["rtt_s"] - 0.3e-3 <= m["rtt_s"] <= 1.5 * p["rtt_s"] + 1e-3, p
        assert p["loss"] == 0 and m["loss"] <= 0.01 and m["udp_packets"] > 0, p
    assert report["impairment_backend"] in ("netem", "fallback")
    assert report["duration_s"] < 150
    leftovers = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f": {PREFIX}" not in leftovers
