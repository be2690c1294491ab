"""The sim backend: max-min fair flows, incast, and whole scenarios in virtual time that write
the run directory an emulated run writes (fast: no daemons, no sleeping)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import simpy

from core.config import ConfigError
from nodes.timeline import EVENTS, read_run_timeline
from sim.network import FlowNetwork, Flow, Port, max_min_rates
from testbed.cli import main
from testbed.config.scenario import load_scenario
from testbed.metrics import expected_request_ids, scenario_predictor, summarize
from testbed.predict import predict

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"


def _flow(*ports: Port) -> Flow:
    return Flow(ports, 1.0, simpy.Environment().event())


def test_max_min_fair_rates_by_progressive_filling():
    a, b = Port("a", 10.0), Port("b", 4.0)
    f1, f2, f3 = _flow(a), _flow(a, b), _flow(b)
    max_min_rates([f1, f2, f3])
    # b is the bottleneck of f2 and f3 (2 each); f1 takes what f2 leaves on a
    assert (f1.rate_bps, f2.rate_bps, f3.rate_bps) == pytest.approx((8.0, 2.0, 2.0))


def test_transfer_time_is_bytes_over_rate_plus_latency_and_incast_shares_the_ingress():
    env = simpy.Environment()
    net = FlowNetwork(env)
    ingress = Port("decode0-efa:down", 8e9, latency_s=10e-6)
    ends: list[float] = []

    def send(src: Port, nbytes: float):
        yield net.transfer((src, ingress), nbytes)
        ends.append(env.now)

    env.process(send(Port("p0:up", 100e9, latency_s=5e-6), 1e9))   # alone: 1 s at 8 Gbit/s
    env.run()
    assert ends == [pytest.approx(1.0 + 15e-6)]
    ends.clear()
    for i in range(4):   # incast: four senders into one 8 Gbit/s ingress each get 2 Gbit/s
        env.process(send(Port(f"p{i}:up", 100e9, latency_s=5e-6), 1e9))
    start = env.now
    env.run()
    assert [e - start for e in ends] == pytest.approx([4.0 + 15e-6] * 4)


def test_loss_stretches_a_transfer_by_the_resent_bytes():
    env = simpy.Environment()
    net = FlowNetwork(env)
    done = net.transfer((Port("x", 8e9, loss=0.2),), 1e9)
    env.run(done)
    assert env.now == pytest.approx(1.0 / 0.8)


def test_tcp_under_loss_is_capped_by_the_mathis_bound_srd_is_not():
    """kv_transfer.transport picks the loss formula: SRD pays only the resent bytes, TCP is also
    held to MSS x 8 / RTT x sqrt(3 / 2p)."""
    from sim.network import mathis_rate_bps

    path = (Port("p:up", 100e9, latency_s=10e-6, loss=0.01, mtu=9001), Port("d:down", 100e9, latency_s=10e-6, mtu=9001))
    times = {}
    for transport in ("srd", "tcp"):
        env = simpy.Environment()
        done = FlowNetwork(env, transport).transfer(path, 1e9)
        env.run(done)
        times[transport] = env.now
    assert times["srd"] == pytest.approx(8.0 / 100 / 0.99 + 20e-6)
    cap = mathis_rate_bps(9001, 40e-6, 0.01)      # 8961 x 8 / 40 us x sqrt(150) = 21.9 Gbit/s
    assert cap == pytest.approx(8961 * 8 / 40e-6 * 150 ** 0.5)
    assert times["tcp"] == pytest.approx(8e9 / 0.99 / cap + 20e-6)
    with pytest.raises(ValueError):
        FlowNetwork(simpy.Environment(), "udp")


def test_quickstart_runs_in_virtual_time_into_a_normal_run_directory(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--backend", "sim", "--out", str(out), "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"total": 20, "completed": 20, "failed": 0, "failed_by_reason": {}}
    assert summary["emulation"]["backend"] == "sim" and summary["fidelity"]["verdict"] == "simulated"
    for name in ("report.html", "requests.csv", "workload.jsonl", "run.json", "scenario.yaml"):
        assert (out / name).is_file(), name
    names = {json.loads(line)["event"] for path in (out / "timeline").glob("*.jsonl")
             for line in path.read_text().splitlines()}
    assert names <= EVENTS and {"arrival", "routed", "prefill_start", "kv_start", "kv_recv_end", "decode_admitted",
                                "first_token", "client_done", "step_timing"} <= names
    # nothing beats an uncontended request; steps alone set TPOT (batching makes them a little longer)
    pred = predict(load_scenario(QUICKSTART))
    assert summary["ttft_ms"]["p50"] >= 0.95 * pred.ttft_s * 1e3
    assert 0.95 * pred.tpot_s * 1e3 <= summary["tpot_ms"]["p50"] <= 1.3 * pred.tpot_s * 1e3
    # deterministic: the same files and seed give the same numbers
    again = tmp_path / "again"
    assert main(["run", str(QUICKSTART), "--backend", "sim", "--out", str(again), "--json"]) == 0
    assert json.loads((again / "summary.json").read_text())["ttft_ms"] == summary["ttft_ms"]


def test_the_streamed_summary_is_the_summary_of_the_whole_sorted_timeline(tmp_path):
    """summary.json comes from one streaming pass over the timeline files (metrics.RunEvents
    keeps a slim record per request); it equals the summary of every event read into memory and
    sorted by time, and the quickstart's figures as computed from that list before streaming
    (bc5cb7e; a change to the cost model or the scheduling changes them, and this test with them)."""
    out = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--backend", "sim", "--out", str(out), "--json"]) == 0
    streamed = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    whole = summarize(read_run_timeline(out), run, json.loads((out / "fidelity.json").read_text()),
                      expected_ids=expected_request_ids(out), predictor=scenario_predictor(out, run))
    assert json.loads(json.dumps(whole)) == streamed
    assert streamed["ttft_ms"]["p50"] == 68.16185891203362 and streamed["itl_ms"]["p99"] == 0.5925921608959106
    assert streamed["itl_ms"]["count"] == 1260 and streamed["e2e_ms"]["mean"] == 113.13014692232207
    assert streamed["kv_transfer"]["count"] == 20 and streamed["kv_transfer"]["time_ms"]["p50"] == 50.89839775143986
    decode, prefill = streamed["nodes"]["decode0"], streamed["nodes"]["prefill0"]
    assert (decode["steps"], decode["busy_s"], decode["step_planned_ms_p50"]) == (899, 0.5040458524661072,
                                                                                  0.5555671479390578)
    assert (prefill["steps"], prefill["busy_s"]) == (14, 0.7283020359901982)
    assert streamed["prediction_check"]["requests"] == 3
    assert streamed["prediction_check"]["ratio"]["ttft"] == 0.9999998193986936


def test_colocated_scenario_and_the_bandwidth_that_makes_the_handoff_slow(tmp_path):
    assert main(["run", str(REPO / "scenarios" / "gpu-baseline.yaml"), "--backend", "sim", "--out",
                 str(tmp_path / "gpu"), "--json"]) == 0
    gpu = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert gpu["counts"]["completed"] == 20 and gpu["kv_transfer"]["count"] == 0
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    for out, bw in ((fast, "1.2Tbps"), (slow, "10Gbps")):
        assert main(["run", str(QUICKSTART), "--backend", "sim", "--out", str(out), "--json",
                     "--set", "kv_transfer.mode=whole", "--set", f"fabric.efa.bandwidth={bw}"]) == 0
    kv = [json.loads((d / "summary.json").read_text())["kv_transfer"]["time_ms"]["p50"] for d in (fast, slow)]
    assert kv[1] > 50 * kv[0]  # a ~180 MB cache: ~1.2 ms at 1.2 Tbit/s, ~150 ms at 10 Gbit/s


def test_link_faults_change_flows_in_flight_and_a_link_down_stalls_them():
    """1 Gbit over an 8 Gbit/s link (0.125 s): at 0.05 s the rate drops to 2 Gbit/s (0.6 Gbit
    left: 0.3 s more), at 0.1 s the link goes down for 0.5 s, then carries the rest (0.5 Gbit at
    2 Gbit/s: 0.25 s). Latency and loss changes apply to transfers that start later."""
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Port("d0-efa:down", 8e9, latency_s=1e-3)
    done = net.transfer((link,), 1e9 / 8)

    def faults():
        yield env.timeout(0.05)
        net.set_link("d0-efa", rate_bps=2e9)
        yield env.timeout(0.05)
        net.set_link("d0-efa", up=False)
        yield env.timeout(0.5)
        net.set_link("d0-efa", up=True, latency_s=2e-3, loss=0.5)

    env.process(faults())
    env.run(done)
    assert env.now == pytest.approx(0.05 + 0.05 + 0.5 + 0.25 + 1e-3)
    start = env.now
    later = net.transfer((link,), 1e9 / 8)   # 1 Gbit at 2 Gbit/s, stretched 2x by 50 % loss, 2 ms latency
    env.run(later)
    assert env.now - start == pytest.approx(1.0 + 2e-3)


def test_link_down_on_the_sim_backend_delays_handoffs_and_loses_nothing(tmp_path):
    """quickstart with the EFA fabric down from 0.5 to 1.0 s model time: every request completes,
    the handoffs caught by the outage end after it, the fault is recorded with every rail it
    changed (pair: trn2's 16 and CS-3's 12 rails)."""
    summary, out = _sim(tmp_path, "down", "faults=[{at: 0.5s, action: link_down, target: efa}, "
                                          "{at: 1.0s, action: link_up, target: efa}]")
    assert summary["counts"]["completed"] == 20
    run = json.loads((out / "run.json").read_text())
    assert [f["ok"] for f in run["faults"]] == [True, True]
    assert len(run["faults"][0]["links"]) == 28 and "decode0-efa-r11" in run["faults"][0]["links"]
    ends = {e["request_id"]: e["t_model"] for e in _events(out, "decode0") if e["event"] == "kv_recv_end"}
    starts = {e["request_id"]: e["t_model"] for e in _events(out, "decode0") if e["event"] == "kv_recv_start"}
    caught = [rid for rid, t in starts.items() if 0.5 < ends[rid] and t < 1.0]
    assert caught and all(ends[rid] >= 1.0 for rid in caught), (starts, ends)


def test_sim_refuses_what_it_does_not_model(tmp_path):
    with pytest.raises(ConfigError, match="faults"):
        from sim.run import run_sim
        from testbed.runner.rundir import RunDir

        sc = load_scenario(QUICKSTART, ["faults=[{at: 1s, action: crash, target: decode0}]"])
        run_sim(sc, RunDir.create(sc.name, tmp_path / "x"))
    with pytest.raises(ConfigError, match="frontend links as fixed latency"):
        sc = load_scenario(QUICKSTART, ["faults=[{at: 1s, action: link_down, target: frontend}]"])
        run_sim(sc, RunDir.create(sc.name, tmp_path / "y"))
    assert main(["up", str(QUICKSTART), "--backend", "sim"]) == 2


def test_cluster_scale_trace_replay_on_the_sim_backend(tmp_path, shared_trace):
    """80 nodes and a slice of the Azure code trace: seconds, every request accounted for."""
    out = tmp_path / "run"
    assert main(["run", str(REPO / "scenarios" / "cluster-trace.yaml"), "--out", str(out), "--json",
                 "--set", "workload.trace.window=2min"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["total"] > 20 and counts["completed"] + counts["failed"] == counts["total"]
    busy = [n["busy_fraction"] for n in summary["nodes"].values() if n["role"] == "prefill"]
    assert len(busy) == 64 and max(busy) > 0  # least-loaded routing spreads the prompts


def test_kv_capacity_bound_makes_handoffs_wait_and_loses_nothing(tmp_path):
    """scenarios/kv-capacity.yaml: 70B on a CS-3 deployment whose KV room is the bottleneck. The
    decode node reserves each request's KV at its grant and never holds more than its capacity;
    handoffs wait for the grant and every request completes."""
    from nodes.costmodel import CostModel
    from nodes.profiles import load_hardware, load_model

    out = tmp_path / "run"
    assert main(["run", str(REPO / "scenarios" / "kv-capacity.yaml"), "--backend", "sim", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["completed"] == summary["counts"]["total"] == 40
    bp = summary["kv_transfer"]["backpressure"]
    assert bp["decode_refused"] >= 10 and bp["decode_wait_ms"]["p50"] > 100  # the decode node's KV is the queue
    capacity = CostModel(load_hardware("cs3"), load_model("llama-3.3-70b")).kv_capacity_bytes()
    events = [json.loads(line) for line in (out / "timeline" / "decode0.jsonl").read_text().splitlines()]
    used, peak, granted = 0, 0, {}
    for e in events:
        if e["event"] == "kv_granted":
            granted[e["request_id"]] = e["kv_model_bytes"]
            used += e["kv_model_bytes"]
            peak = max(peak, used)
        elif e["event"] == "decode_done":
            used -= granted.pop(e["request_id"])
    assert not granted and capacity / 2 < peak <= capacity  # filled, never overfilled
    rows = (out / "requests.csv").read_text().splitlines()
    header = rows[0].split(",")
    waits = [r.split(",")[header.index("kv_wait_ms")] for r in rows[1:]]
    assert sum(1 for w in waits if w) == bp["decode_refused"]


def _sim(tmp_path: Path, name: str, *sets: str) -> tuple[dict, Path]:
    out = tmp_path / name
    args = ["run", str(QUICKSTART), "--backend", "sim", "--out", str(out), "--json"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text()), out


def _events(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / "timeline" / f"{name}.jsonl").read_text().splitlines()]


def test_slowdown_fault_stretches_the_node_s_steps_from_its_time_on(tmp_path):
    """slowdown x2 on decode0 from 0 s: every decode step takes twice its cost-model time, so TPOT
    doubles (virtual time is deterministic; the band allows for the larger batches that slower
    steps gather, which lengthen a step by a few percent); prefill is untouched."""
    base, _ = _sim(tmp_path, "base")
    slow, out = _sim(tmp_path, "slow", "faults=[{at: 0s, action: slowdown, target: decode0, factor: 2}]")
    assert slow["counts"]["completed"] == 20
    assert 1.95 <= slow["tpot_ms"]["p50"] / base["tpot_ms"]["p50"] <= 2.2
    control = [e for e in _events(out, "decode0") if e["event"] == "control"]
    assert [(e["cmd"], e["factor"]) for e in control] == [("slowdown", 2.0)]
    steps = [e for e in _events(out, "prefill0") if e["event"] == "step_timing"]
    base_steps = [e for e in _events(tmp_path / "base", "prefill0") if e["event"] == "step_timing"]
    assert sum(e["planned_s"] for e in steps) == pytest.approx(sum(e["planned_s"] for e in base_steps), rel=0.05)
    run = json.loads((out / "run.json").read_text())
    assert run["faults"][0]["ok"] is True and run["faults"][0]["applied_t_model"] == 0.0


def test_drain_and_resume_steer_routing_and_draining_everything_fails_requests(tmp_path):
    """Two decode nodes on the pod topology, routed round robin: decode1 drained at 0 s gets no
    request until it is resumed at 0.4 s (11 of the 20 arrivals come later); with both drained,
    every request fails with the router's 503 reason."""
    pod = ["topology=pod", "pools.prefill.count=1", "pools.decode.count=2", "router.decode_policy=round_robin"]
    summary, out = _sim(tmp_path, "drain", *pod, "faults=[{at: 0s, action: drain, target: decode1}, "
                                                 "{at: 0.4s, action: resume, target: decode1}]")
    assert summary["counts"]["completed"] == 20
    routed = [(e["t_model"], e["decode"]) for e in _events(out, "router") if e["event"] == "routed"]
    before = {d for t, d in routed if t < 0.4}
    after = [d for t, d in routed if t > 0.4]
    assert before == {"decode0"} and after.count("decode1") >= len(after) // 2, routed
    summary, out = _sim(tmp_path, "none", *pod, "faults=[{at: 0s, action: drain, target: decode0}, "
                                                "{at: 0s, action: drain, target: decode1}]")
    assert summary["counts"]["completed"] == 0 and summary["counts"]["failed"] == 20
    reasons = {e["reason"] for e in _events(out, "router") if e["event"] == "failed"}
    assert reasons == {"no available decode node"}
