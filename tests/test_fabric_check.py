"""``pdtb fabric check topologies/pair.yaml --json`` on this machine's impairment backend."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX = "pb"
"""A prefix of this test's own, so that its cleanup never touches another run's interfaces."""


@pytest.mark.root
@pytest.mark.timeout(180)
def test_pair_within_tolerance():
    argv = [sys.executable, "-m", "testbed.cli", "fabric", "check", str(REPO / "topologies" / "pair.yaml"),
            "--json", "--prefix", PREFIX]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    failed = [(p["src"], p["dst"], p["cls"], p["verdicts"], p["measured"]) for p in report["probes"] if not p["ok"]]
    assert proc.returncode == 0 and report["ok"], failed
    # every shaped link was measured, and each path was judged on goodput and RTT
    links = {name for p in report["probes"] for name in p["links"]}
    assert {"prefill0-efa", "decode0-efa", "client0-fe", "router-fe"} <= links
    for p in report["probes"]:
        assert p["verdicts"]["goodput"] == "PASS" and p["verdicts"]["rtt"] == "PASS", p
    assert report["impairment_backend"] in ("netem", "fallback")
    assert report["duration_s"] < 120
    leftovers = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f": {PREFIX}" not in leftovers
