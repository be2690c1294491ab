"""Local backend: process supervision, the run directory, and whole runs on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_helpers import DECODE_HW, PREFIX, REPO, alive, interruptible, no_leftovers, wait_for, write_scenario
from core.pids import PidRegistry, kill_recorded, same_process
from testbed.runner.process import Supervisor
from testbed.runner.rundir import RunDir, make_run_id

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# ignores SIGTERM: must be SIGKILLed after the grace period
STUBBORN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"]


def test_supervisor_own_group_registry_and_stop(tmp_path: Path) -> None:
    run_reg, clean_reg = PidRegistry(tmp_path / "pids.jsonl"), PidRegistry(tmp_path / "prefix" / "pids.jsonl")
    sup = Supervisor([run_reg, clean_reg])
    a = sup.spawn("a", SLEEPER, log_path=tmp_path / "logs" / "a.log")
    b = sup.spawn("b", STUBBORN, log_path=tmp_path / "logs" / "b.log")
    assert os.getpgid(a.pid) == a.pid != os.getpgid(0), "each daemon leads its own process group"
    recorded = {e["name"]: e for e in run_reg.entries()}
    assert recorded["a"]["pid"] == a.pid and recorded["a"]["pgid"] == a.pid and recorded["b"]["start_ticks"]
    assert [(e["pid"], e["name"]) for e in clean_reg.alive()] == [(a.pid, "a"), (b.pid, "b")], \
        "pdtb clean's registry learns every PID"
    assert wait_for(lambda: "ready" in (tmp_path / "logs" / "b.log").read_text())
    t = time.monotonic()
    sup.stop_all(grace_s=0.5)
    assert time.monotonic() - t < 5
    assert not alive(a.pid) and not alive(b.pid)
    assert run_reg.alive() == [] and clean_reg.alive() == []
    assert {e["name"]: e["running"] for e in run_reg.entries()} == {"a": False, "b": False}, "the record keeps the history"
    assert sup.unexpected_exits() == [], "processes we stopped are not crashes"


def test_unexpected_exit_is_reported_once(tmp_path: Path) -> None:
    sup = Supervisor([PidRegistry(tmp_path / "pids.jsonl")])
    sup.spawn("quick", [sys.executable, "-c", "raise SystemExit(3)"])
    sup.spawn("slow", SLEEPER)
    assert wait_for(lambda: sup.get("quick").poll() is not None)
    crashed = sup.unexpected_exits()
    assert [m.name for m in crashed] == ["quick"] and crashed[0].poll() == 3
    assert sup.unexpected_exits() == []
    sup.stop_all(grace_s=1)


def test_kill_recorded_skips_recycled_pids(tmp_path: Path) -> None:
    """`pdtb clean` kills by registry: a PID whose start time changed is someone else's."""
    victim = subprocess.Popen(SLEEPER, start_new_session=True)
    bystander = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        reg = PidRegistry(tmp_path / "pids.jsonl")
        reg.record(victim.pid, "victim", pgid=victim.pid, argv=SLEEPER)
        entries = reg.entries()
        entries.append({"name": "fake", "pid": bystander.pid, "pgid": None, "start_ticks": 1})
        killed = kill_recorded(entries, grace_s=2)
        assert killed == [victim.pid]
        victim.wait(5)
        assert bystander.poll() is None and same_process(bystander.pid, None)
    finally:
        for p in (victim, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_run_dir_layout_and_run_id(tmp_path: Path) -> None:
    rd = RunDir.create("pair", base=tmp_path)
    assert rd.root.parent == tmp_path and rd.root.name.startswith("pair-")
    for d in ("nodes", "logs", "timeline", "pcap"):
        assert (rd.root / d).is_dir()
    assert oct(rd.nodes_dir.stat().st_mode & 0o777) == "0o700"
    rd2 = RunDir.create("pair", base=tmp_path)
    assert rd2.root != rd.root and rd2.run_id != rd.run_id
    rd.update_run_json(backend="local", tdf=2.0)
    rd.update_run_json(finished_wall=1.0)
    assert json.loads(rd.run_json.read_text()) == {"backend": "local", "tdf": 2.0, "finished_wall": 1.0}
    from core.config import _check_name

    for name in ("pair", "a-very-long-scenario-name-indeed-yes", "x", "9lives"):
        _check_name(make_run_id(name, "20261126T203000Z"))


# ---------------------------------------------------------------- whole runs on loopback
def _pdtb(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", *args, "--prefix", PREFIX], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_local_run_completes_every_request(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path)
    out = tmp_path / "run"
    proc = _pdtb("run", str(scenario), "--backend", "local", "--out", str(out), "--json",
                 "--set", "workload.requests=6")
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["counts"] == {"total": 6, "completed": 6, "failed": 0, "failed_by_reason": {}}, stderr
    assert summary["ttft_ms"]["p50"] > 0 and summary["tpot_ms"]["p50"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "local" and run["scenario"] == "loctest" and run["tdf"] == 1.0
    assert set(run["nodes"]) == {"router", "p1", "d1", "client"}
    assert run["nodes"]["d1"]["role"] == "decode" and run["nodes"]["d1"]["hardware"] == DECODE_HW
    addrs = {n["addresses"]["frontend"].split(":")[0] for n in run["nodes"].values() if "frontend" in n["addresses"]}
    assert len(addrs) == 3 and all(a.startswith("127.0.0.") for a in addrs), "a loopback address per node"
    assert run["finished_wall"] >= run["started_wall"] and run["crashes"] == []
    # after a clean stop the `pdtb clean` registry keeps nothing of this run
    assert not Path(f"/run/pdtb/{PREFIX}/pids.jsonl").exists() or os.geteuid() != 0
    assert "requests=6" not in (out / "scenario.yaml").read_text() and "requests: 6" in (out / "scenario.yaml").read_text()
    for node in ("router", "p1", "d1", "client"):
        assert (out / "logs" / f"{node}.log").exists() and (out / "timeline" / f"{node}.jsonl").exists()
        assert oct((out / "nodes" / f"{node}.json").stat().st_mode & 0o777) == "0o600"
    assert len((out / "workload.jsonl").read_text().splitlines()) == 6
    assert (out / "summary.json").exists()
    # the default KV transport is SRD; on loopback (no shaped links) the sender is not paced
    kv = json.loads((out / "nodes" / "p1.json").read_text())["kv_transfer"]
    assert (kv["transport"], kv["rate_bps"]) == ("srd", 0.0) and kv["rto_s"] == pytest.approx(50e-6)
    ends = [json.loads(line) for line in (out / "timeline" / "p1.jsonl").read_text().splitlines()
            if '"kv_end"' in line]
    assert len(ends) == 6 and all(e["ok"] and e["transport"] == "srd" and e["packets"] > 0 for e in ends)
    no_leftovers(out)


@pytest.mark.slow
def test_daemon_crash_is_recorded_and_every_request_accounted(tmp_path: Path) -> None:
    """A decode node killed mid-run (not a fault): the run ends early, the rest fail as node_crashed."""
    from testbed import Testbed

    scenario = write_scenario(tmp_path, requests=40, rate=4.0, output=64)
    with Testbed(scenario, backend="local", out=tmp_path / "run", prefix=PREFIX) as tb:
        tb.run_workload(wait=False)
        client_tl = tb.run_dir / "timeline" / "client.jsonl"
        assert wait_for(lambda: client_tl.exists() and b"client_done" in client_tl.read_bytes(), 30)
        os.kill(tb._orch.sup.get("d1").pid, signal.SIGKILL)
        assert tb.wait(60)
    summary = tb.results()
    counts = summary["counts"]
    assert counts["total"] == 40 and 1 <= counts["completed"] < 40
    assert counts["completed"] + counts["failed"] == 40
    from nodes.timeline import read_timeline

    marked = [e for e in read_timeline(tb.run_dir / "timeline" / "client.jsonl")
              if e["event"] == "client_failed" and e["reason"] == "node_crashed:d1"]
    assert marked, "requests the run could no longer serve are marked with the crashed node"
    run = json.loads((tb.run_dir / "run.json").read_text())
    assert [c["node"] for c in run["crashes"]] == ["d1"] and run["stop_reason"] == "node_crashed:d1"
    no_leftovers(tb.run_dir)


@pytest.mark.slow
def test_sigint_to_pdtb_run_cleans_up_and_writes_summary(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, requests=60, rate=4.0, output=32)
    out = tmp_path / "run"
    proc = _pdtb("run", str(scenario), "--backend", "local", "--out", str(out), "--no-progress",
                 preexec_fn=interruptible)
    client_tl = out / "timeline" / "client.jsonl"
    try:
        assert wait_for(lambda: client_tl.exists() and b"client_done" in client_tl.read_bytes(), 40)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["total"] == 60 and summary["counts"]["completed"] < 60
    assert json.loads((out / "run.json").read_text())["stop_reason"] == "interrupted"
    no_leftovers(out)


def test_pool_batching_keys_and_client_stream_reach_the_daemons(tmp_path: Path) -> None:
    extra = "pools:\n  prefill: {token_budget: 1024, chunk_tokens: 256, max_queue: 50}\n  decode: {max_batch: 2}\n"
    scenario = write_scenario(tmp_path, requests=4, rate=50.0, extra=extra)
    out = tmp_path / "run"
    proc = _pdtb("run", str(scenario), "--backend", "local", "--out", str(out), "--json",
                 "--set", "workload.stream=false")
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["counts"]["completed"] == 4, stderr
    p1 = json.loads((out / "nodes" / "p1.json").read_text())
    d1 = json.loads((out / "nodes" / "d1.json").read_text())
    client = json.loads((out / "nodes" / "client.json").read_text())
    assert p1["prefill"] == {"token_budget": 1024, "chunk_tokens": 256, "max_queue": 50}
    assert d1["decode"] == {"max_batch": 2, "max_queue": 512}  # the default where the scenario is silent
    assert client["client"]["stream"] is False
    steps = [json.loads(line) for line in (out / "timeline" / "p1.jsonl").read_text().splitlines()]
    # 512-token prompts in 256-token chunks: every prefill step takes at most 1024 tokens
    starts = [e for e in steps if e["event"] == "prefill_start"]
    assert starts and all(e["batch_tokens"] <= 1024 for e in starts)
    decode_steps = [e for e in (json.loads(line) for line in (out / "timeline" / "d1.jsonl").read_text().splitlines())
                    if e["event"] == "step_timing"]
    assert decode_steps and max(e["batch_size"] for e in decode_steps) <= 2
    no_leftovers(out)
