"""Faults on a model-time schedule change what is measured after their time, and not before."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from statistics import median

import pytest
from run_helpers import PREFIX, no_leftovers, run_pdtb, write_scenario

from nodes.timeline import read_run_timeline

pytestmark = pytest.mark.timeout(300)   # above each run's own limit + run_helpers.TEARDOWN_S


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return run_pdtb(["run", *args, "--json", "--no-progress"], timeout)


def _by_request(run_dir: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for e in read_run_timeline(run_dir):
        if e.get("request_id"):
            out.setdefault(e["request_id"], {}).setdefault(e["event"], e)
    return out


@pytest.mark.slow
def test_slowdown_fault_changes_decode_after_its_time_only(tmp_path: Path) -> None:
    """Local backend: a decode slowdown x10 at model time 2 s. Requests finished before 2 s decode at
    the predicted pace; requests that start decoding after it are about ten times slower."""
    fault_at = 2.0
    scenario = write_scenario(tmp_path, requests=16, rate=4.0, output=24, extra=f"""
faults:
  - {{at: {fault_at}s, action: slowdown, target: d1, factor: 10}}
""")
    out = tmp_path / "run"
    res = _run([str(scenario), "--backend", "local", "--out", str(out), "--prefix", PREFIX,
                "--set", "emulation.tdf=4"], timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["counts"]["completed"] == 16
    run = json.loads((out / "run.json").read_text())
    (fault,) = run["faults"]
    assert fault["ok"] and fault["action"] == "slowdown" and fault["applied_t_model"] >= fault_at
    assert fault["applied_t_model"] < fault_at + 0.1, "applied on time (model seconds)"
    offset = run["workload_offset_s"]
    before, after = [], []
    for rid, ev in _by_request(out).items():
        done, first = ev.get("client_done"), ev.get("decode_admitted")
        if not done or not first:
            continue
        times = done["token_times"]
        tpot = (times[-1] - times[0]) / (len(times) - 1)
        if times[-1] - offset < fault_at:
            before.append(tpot)
        elif first["t_model"] - offset > fault_at + 0.05:
            after.append(tpot)
    assert len(before) >= 3 and len(after) >= 3, (before, after)
    assert median(after) > 5 * median(before), (before, after)


@pytest.mark.root
@pytest.mark.slow
def test_set_link_fault_slows_kv_handoff_after_its_time_only(tmp_path: Path) -> None:
    """Mininet: EFA cut from 3.2/1.2 Tbit/s to 30 Gbit/s at model time 1.5 s; KV handoffs before take
    a few milliseconds of model time, those after tens. Sized for rails (docs/fabric.md#rails):
    2048-token prompts put 1 MiB on the wire, 85 KiB on each of the CS-3's 12 rails, well above a
    rail's HTB head start after idle (two 9001-byte packets); and 30 Gbit/s leaves each rail
    1.95 Mbit/s emulated, where a jumbo packet takes 37 ms (at 3 Gbit/s it would take 0.37 s, past
    TCP's retransmission timer: a collapse of the emulation, not of the modelled fabric)."""
    from fabric.cleanup import clean

    clean("pc")
    fault_at = 1.5
    path = tmp_path / "s.yaml"
    path.write_text(f"""
kind: scenario
name: efacut
topology: pair
model: llama-3.1-8b
kv_transfer: {{mode: whole}}
emulation: {{backend: mininet, tdf: 5, byte_scale: 0.00390625}}
workload:
  arrival: {{process: fixed, rate: 4}}
  requests: 12
  prompt_tokens: 2048
  output_tokens: 8
faults:
  - {{at: {fault_at}s, action: set_link, target: efa, bandwidth: 30Gbps}}
""")
    out = tmp_path / "run"
    res = _run([str(path), "--out", str(out), "--prefix", "pc"], timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["counts"]["completed"] == 12
    run = json.loads((out / "run.json").read_text())
    (fault,) = run["faults"]
    assert fault["ok"] and sorted(fault["links"]) == ["decode0-efa", "prefill0-efa"]
    offset = run["workload_offset_s"]
    before, after = [], []
    for ev in _by_request(out).values():
        start, end = ev.get("kv_start"), ev.get("kv_end")
        if not start or not end:
            continue
        took = end["t_model"] - start["t_model"]
        (before if end["t_model"] - offset < fault_at else after if start["t_model"] - offset > fault_at else []).append(took)
    assert len(before) >= 3 and len(after) >= 3, (before, after)
    # 256 MiB of model KV: ~1.8 ms at 1.2 Tbit/s, ~72 ms at 30 Gbit/s (less the rails' head start:
    # 12 x 18 KB of the 1 MiB on the wire, ~20 %, so > 50 ms)
    assert median(after) > 0.03 and median(after) > 5 * median(before), (before, after)


@pytest.mark.slow
def test_crash_fault_fails_requests_after_its_time_only(tmp_path: Path) -> None:
    """Local backend: the only prefill node crashes (a fault, not an unexpected crash) at 1.5 s.
    Requests finished before complete; requests sent after it fail; the run still ends normally."""
    fault_at = 1.5
    scenario = write_scenario(tmp_path, requests=12, rate=4.0, output=8, extra=f"""
faults:
  - {{at: {fault_at}s, action: crash, target: p1}}
""")
    out = tmp_path / "run"
    res = _run([str(scenario), "--backend", "local", "--out", str(out), "--prefix", PREFIX], timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["counts"]["total"] == 12
    run = json.loads((out / "run.json").read_text())
    assert run["crashes"] == [] and run["stop_reason"] is None, "a crash fault is not a daemon crash"
    assert run["faults"][0]["ok"]
    offset = run["workload_offset_s"]
    done_before, failed_after = 0, 0
    for ev in _by_request(out).values():
        sent = ev.get("client_sent")
        if sent is None:
            continue
        t = sent["t_model"] - offset
        if t < fault_at - 0.3:
            assert "client_done" in ev, ev.get("client_failed")
            done_before += 1
        elif t > fault_at + 0.1:
            assert "client_failed" in ev
            failed_after += 1
    assert done_before >= 3 and failed_after >= 3
    p1 = [json.loads(x) for x in (out / "timeline" / "p1.jsonl").read_text().splitlines()]
    assert [e["cmd"] for e in p1 if e["event"] == "control"] == ["crash"]
    no_leftovers(out)


def test_faults_the_backend_cannot_apply_are_refused_before_anything_starts(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, extra="""
faults:
  - {at: 1s, action: link_down, target: efa}
  - {at: 2s, action: drain, target: client}
""")
    out = tmp_path / "run"
    res = _run([str(scenario), "--backend", "local", "--out", str(out)], timeout=30)
    assert res.returncode == 2
    assert "faults[0].action: link_down needs emulated or simulated links" in res.stderr
    assert "faults[1].target: 'client' is not a serving node" in res.stderr
    assert not out.exists(), "nothing was started, no run directory made"


def test_lost_nodes_are_retried_and_every_request_completes(tmp_path: Path) -> None:
    """Mininet (pod): decode0 crashes mid-stream at 1.0 s and prefill0 with its queue at 1.2 s
    (model time). The router retries each request those nodes held on the others (delivered tokens
    re-prefilled, the stream continued at its index): every request completes, each client stream
    is whole, nothing is left behind. 4k-token prompts keep prefill0 busy (~0.6 s each) and
    128-token decodes (~0.1 s) overlap the crash, so both losses hit requests in flight."""
    if os.geteuid() != 0:
        pytest.skip("needs root (Mininet)")
    scenario = tmp_path / "faults.yaml"
    scenario.write_text("""
kind: scenario
name: lost-nodes
topology: pod
model: llama-3.1-8b
pools: {prefill: {count: 2}, decode: {count: 2}}
router: {prefill_policy: round_robin, decode_policy: round_robin, retries: 2}
emulation: {backend: mininet, tdf: 10, byte_scale: 0.00390625}
workload:
  arrival: {process: fixed, rate: 8}
  requests: 16
  prompt_tokens: 4096
  output_tokens: 128
faults:
  - {at: 1.0s, action: crash, target: decode0}
  - {at: 1.2s, action: crash, target: prefill0}
""")
    out = tmp_path / "run"
    res = _run([str(scenario), "--out", str(out), "--prefix", PREFIX], timeout=230)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["counts"] == {"total": 16, "completed": 16, "failed": 0, "failed_by_reason": {}}
    by_rid = _by_request(out)
    retried = [e for e in read_run_timeline(out) if e["event"] == "retried"]
    assert {"decode0"} <= {e["lost"] for e in retried} <= {"decode0", "prefill0"}
    for e in retried:  # each retried request reached its client whole
        assert by_rid[e["request_id"]]["client_done"]["output_tokens"] == 128
    no_leftovers(out)


def test_link_down_loss_burst_and_restarts_leave_every_request_accounted(tmp_path: Path) -> None:
    """Mininet (pair, TDF 10): the EFA network goes down for 0.5 s model (5 s wall) while KV
    caches cross it, then 10 % loss for 0.4 s, then the MQTT broker restarts, then the router
    restarts. Handoffs caught by the outage or the loss complete late; requests after the broker
    restart complete (nodes reconnect); the router restart fails only what it held or what came
    while it was down, each with a reason; every request ends accounted; nothing is left behind."""
    if os.geteuid() != 0:
        pytest.skip("needs root (Mininet)")
    scenario = tmp_path / "faults.yaml"
    scenario.write_text("""
kind: scenario
name: outages
topology: pair
model: llama-3.1-8b
emulation: {backend: mininet, tdf: 10, byte_scale: 0.00390625}
workload:
  arrival: {process: fixed, rate: 8}
  requests: 28
  prompt_tokens: 1536
  output_tokens: 64
faults:
  - {at: 0.5s, action: link_down, target: efa}
  - {at: 1.0s, action: link_up, target: efa}
  - {at: 1.2s, action: set_link, target: efa, loss: 10%}
  - {at: 1.6s, action: set_link, target: efa, loss: 0}
  - {at: 1.8s, action: restart, target: broker}
  - {at: 2.6s, action: restart, target: router}
""")
    out = tmp_path / "run"
    res = _run([str(scenario), "--out", str(out), "--prefix", PREFIX], timeout=230)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    counts = summary["counts"]
    assert counts["total"] == 28 and counts["completed"] + counts["failed"] == 28
    run = json.loads((out / "run.json").read_text())
    assert all(f["ok"] for f in run["faults"]), run["faults"]
    offset = run["workload_offset_s"]
    by_rid = _by_request(out)
    sent = {rid: ev["client_sent"]["t_model"] - offset for rid, ev in by_rid.items() if "client_sent" in ev}
    # before the router restart (minus the longest a request takes here) everything completes,
    # the outage and the loss only delay; so do requests between the broker and router restarts
    early = [rid for rid, t in sent.items() if t < 2.0]
    assert len(early) >= 14 and all("client_done" in by_rid[rid] for rid in early), \
        [(rid, by_rid[rid].get("client_failed")) for rid in early if "client_done" not in by_rid[rid]]
    outage = [rid for rid, ev in by_rid.items() if "kv_end" in ev and ev["kv_start"]["t_model"] - offset < 1.0
              and ev["kv_end"]["t_model"] - offset > 1.0]
    assert outage, "a KV handoff crossed the outage"
    for rid, ev in by_rid.items():  # every failure has a reason
        if "client_failed" in ev:
            assert ev["client_failed"].get("reason") and sent[rid] > 2.0
    no_leftovers(out)
