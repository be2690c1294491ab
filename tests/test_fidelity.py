"""Fidelity verdicts from synthetic samples, the automatic dilation choice and the check's plan."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fabric.check import Probe, judge, plan_passes, plan_routes
from fabric.dilation import carried_rate_bound_bps, choose_emulation, load_host_capacity, rate_cap_bps
from fabric.fidelity import FidelityMonitor, evaluate, read_step_errors
from fabric.topology import load_topology

RATE = 100e6


def _samples(delivered_ratio: float, backlog: int, n: int = 8, busy: float = 0.5,
             rate_bps: float = RATE) -> list[dict]:
    """n samples 0.5 s apart of one port sending at ``delivered_ratio`` x its rate, with a
    standing queue of ``backlog`` packets, on two CPUs ``busy`` busy."""
    out = []
    for i in range(n):
        t = i * 0.5
        jiffies = int(t * 100)
        out.append({"t": t, "cpu": [[int(jiffies * busy), jiffies]] * 2,
                    "ports": {"pts1-1": {"link": "d0-efa", "rate_bps": rate_bps,
                                         "bytes": int(delivered_ratio * rate_bps / 8 * t),
                                         "backlog_packets": backlog, "backlog_bytes": backlog * 1514,
                                         "drops": 0}}})
    return out


def test_backlogged_link_at_its_rate_is_trustworthy():
    v = evaluate(_samples(0.97, backlog=40))
    assert v["trustworthy"], v["reasons"]
    assert v["ports"]["pts1-1"]["backlogged_intervals"] == 7
    assert v["ports"]["pts1-1"]["median_delivered_ratio"] == pytest.approx(0.97, rel=0.02)


def test_backlogged_link_below_its_rate_is_flagged():
    v = evaluate(_samples(0.5, backlog=40))
    assert not v["trustworthy"]
    assert any("d0-efa" in r and "50%" in r for r in v["reasons"])


def test_idle_link_is_not_blamed_for_sending_little():
    v = evaluate(_samples(0.05, backlog=0))
    assert v["trustworthy"], v["reasons"]


def test_saturated_cpu_is_flagged():
    v = evaluate(_samples(0.97, backlog=40, busy=0.99))
    assert not v["trustworthy"]
    assert any("CPU saturated" in r for r in v["reasons"])
    assert v["cpu"]["saturated_intervals"] == 7


GOOD = _samples(0.97, backlog=40)


def test_late_compute_steps_are_flagged():
    late = evaluate(GOOD, [0.10] * 50, step_error_threshold=0.05)
    assert late["verdict"] == "untrustworthy" and not late["trustworthy"]
    tail = evaluate(GOOD, [0.0] * 95 + [0.5] * 5, step_error_threshold=0.05)     # median fine, p99 not: a warning
    assert tail["trustworthy"] and "p99" in tail["warnings"][0]
    many = evaluate(GOOD, [0.0] * 85 + [0.06] * 15, step_error_threshold=0.05)   # 15 % of steps late
    assert not many["trustworthy"] and "15.0% of the steps" in many["reasons"][0]
    ok = evaluate(GOOD, [0.01] * 100, step_error_threshold=0.05)
    assert ok["verdict"] == "trustworthy" and ok["step_timing"]["median"] == pytest.approx(0.01)


def test_late_delayer_is_flagged():
    on_time = {"intf": "ptd0-e", "latency_s": 0.005, "released": 1000, "late_total_s": 0.05, "late_max_s": 0.002}
    assert evaluate(GOOD, delayers=[on_time])["trustworthy"]                 # 0.05 ms late on average
    late = on_time | {"late_total_s": 2.0}                                    # 2 ms late on average
    v = evaluate(GOOD, delayers=[on_time, late | {"intf": "ptd1-e"}])
    assert not v["trustworthy"] and "ptd1-e" in v["reasons"][0]
    assert v["delayers"]["ptd1-e"]["late_mean_s"] == pytest.approx(0.002)


# -- the verdict fails closed: nothing is trustworthy without measurements behind it ----------------
def test_no_samples_is_unmeasured_not_trustworthy():
    for samples in ([], GOOD[:1]):
        v = evaluate(samples)
        assert v["verdict"] == "unmeasured" and not v["trustworthy"]
        assert "fewer than two" in v["unmeasured"][0] and v["reasons"] == v["unmeasured"]


def test_a_shaped_port_never_sampled_is_unmeasured():
    v = evaluate(GOOD, expected_ports=["pts1-1", "pts2-1"])
    assert v["verdict"] == "unmeasured" and "pts2-1" in v["unmeasured"][0]
    assert evaluate(GOOD, expected_ports=["pts1-1"])["verdict"] == "trustworthy"


def test_failed_samples_make_a_clean_run_unmeasured_and_a_bad_one_stays_untrustworthy():
    err = ["OSError: tc qdisc show in the namespace of pid 7 failed (exit 1): Cannot find device"]
    v = evaluate(GOOD, sampling_errors=err)
    assert v["verdict"] == "unmeasured" and "tc qdisc show" in v["reasons"][0]
    bad = evaluate(_samples(0.5, backlog=40), sampling_errors=err)
    assert bad["verdict"] == "untrustworthy" and len(bad["reasons"]) == 2


def test_an_unwatched_delayer_is_unmeasured():
    v = evaluate(GOOD, unwatched=["delayer on ptd0-e (added after the last sample)"])
    assert v["verdict"] == "unmeasured" and "ptd0-e" in v["reasons"][0]


def test_failing_tc_is_an_error_not_an_empty_sample(monkeypatch):
    import subprocess

    from fabric import fidelity

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "Cannot open netns"))
    with pytest.raises(OSError, match="Cannot open netns"):
        fidelity.read_qdiscs(12345)


def test_monitor_whose_sampler_fails_writes_unmeasured(tmp_path: Path, monkeypatch):
    from fabric import fidelity

    def broken(pid):
        raise OSError("tc qdisc show failed (exit 2)")

    monkeypatch.setattr(fidelity, "read_qdiscs", broken)
    port = fidelity.ShapedPort(link="d0-efa", name="ptd0-e", pid=None, intf=object())
    mon = FidelityMonitor(object(), tmp_path, interval_s=0.02, ports=[port], delayers=[]).start()
    time.sleep(0.15)
    verdict = mon.stop()
    written = json.loads((tmp_path / "fidelity.json").read_text())
    assert verdict["verdict"] == written["verdict"] == "unmeasured"
    assert written["sampling_errors"] and "tc qdisc show failed" in written["sampling_errors"][0]


def test_monitor_watches_a_delayer_a_fault_adds_mid_run(tmp_path: Path):
    class _Net:
        def __init__(self) -> None:
            self.d: dict = {}

        def delayers(self) -> dict:
            return self.d

    net = _Net()
    mon = FidelityMonitor(net, tmp_path, interval_s=0.02, ports=[]).start()
    time.sleep(0.06)
    net.d["ptd0-e"] = _FakeDelayer()   # a fault starts a delayer
    time.sleep(0.1)
    verdict = mon.stop()
    assert "ptd0-e" in verdict["delayers"] and verdict["verdict"] == "trustworthy", verdict["reasons"]
    mon2 = FidelityMonitor(net, tmp_path, interval_s=10.0, ports=[]).start()   # samples once, then waits
    time.sleep(0.05)
    net.d["ptd1-e"] = _FakeDelayer()   # appears after the last sample: never watched
    late = mon2.stop()
    assert late["verdict"] == "unmeasured" and any("ptd1-e" in r for r in late["unmeasured"])


def test_unmeasured_verdict_reaches_the_summary():
    from fabric.fidelity import unmeasured_verdict
    from testbed.metrics import fidelity_verdict

    f = fidelity_verdict(unmeasured_verdict("the fidelity monitor could not start: OSError: no tc"), {})
    assert f["verdict"] == "unmeasured" and "could not start" in f["reasons"][0]
    assert fidelity_verdict({"ports": {}}, {})["verdict"] == "untrustworthy"   # no verdict, no trust


def test_step_errors_read_from_timeline(tmp_path: Path):
    tl = tmp_path / "timeline"
    tl.mkdir()
    lines = [{"event": "step_timing", "planned_s": 0.02, "late_s": 0.001},
             {"event": "step_timing", "planned_s": 0.0, "late_s": 0.001},       # no planned time: skipped
             {"event": "first_token", "request_id": "r1"},
             {"event": "step_timing", "planned_s": 0.01, "late_s": -0.001}]     # early counts as 0
    (tl / "decode0.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    assert read_step_errors(tmp_path) == pytest.approx([0.05, 0.0])


class _FakeDelayer:
    intf_name, latency_s = "ptd0-e", 0.004

    def __init__(self) -> None:
        self.calls = 0

    def stats(self) -> dict:
        self.calls += 1       # 100 packets released 0.1 ms late between start and stop
        return {"released": 100 * self.calls, "late_total_s": 0.01 * self.calls, "late_max_s": 0.0002}


def test_monitor_writes_fidelity_json(tmp_path: Path):
    mon = FidelityMonitor(object(), tmp_path, interval_s=0.05, ports=[], delayers=[_FakeDelayer()]).start()
    time.sleep(0.3)
    verdict = mon.stop()
    written = json.loads((tmp_path / "fidelity.json").read_text())
    assert written["trustworthy"] == verdict["trustworthy"]
    assert written["samples"] >= 3 and written["cpu"]["intervals"] >= 2
    assert written["delayers"]["ptd0-e"] == {"latency_s": 0.004, "released": 100, "late_mean_s": pytest.approx(1e-4),
                                             "late_max_s": 0.0002}


def test_monitor_takes_the_nets_delayers(tmp_path: Path):
    class _Net:
        def delayers(self) -> dict:
            return {"ptd0-e": _FakeDelayer()}

    mon = FidelityMonitor(_Net(), tmp_path, interval_s=0.05, ports=[]).start()
    verdict = mon.stop()
    assert verdict["delayers"]["ptd0-e"]["released"] == 100


# -- dilation ------------------------------------------------------------------------------------

def test_auto_puts_the_busiest_links_under_the_cap():
    pair = load_topology("pair")
    c = choose_emulation(pair, "auto", "auto", host_capacity=4e9)          # cap: 1 Gbit/s
    assert c.tdf == pytest.approx(1e-3 / 7.5e-6)        # 7.5 us -> 1 ms beats 100 Gbit/s -> 1 Gbit/s
    # the 3.2 Tbit/s prefill link carries no more than the 1.2 Tbit/s decode link takes
    assert c.byte_scale == pytest.approx(1e9 * c.tdf / 1.2e12)
    assert "latency floor" in c.reason and c.host_capacity_bps == 4e9
    slow = choose_emulation(pair, "auto", "auto", host_capacity=600e6)     # cap: 300 Mbit/s
    assert slow.tdf == pytest.approx(100e9 / 300e6)                        # frontend is not byte-scaled
    assert "unscaled-network rate floor" in slow.reason
    assert 1.2e12 * slow.byte_scale / slow.tdf == pytest.approx(300e6)


def test_auto_latency_floor_and_budget():
    pod = load_topology("pod")
    # unshaped plain links (rails: None; a link with rails and no bandwidth takes the profile's rate)
    lat_only = pod.model_copy(update={"links": [lk.model_copy(update={"rails": None, "params": lk.params.model_copy(
        update={"bandwidth_bps": None})}) for lk in pod.links]})
    c = choose_emulation(lat_only, "auto", "auto", host_capacity=4e9)
    assert c.tdf == pytest.approx(1e-3 / 7.5e-6) and c.byte_scale == 1.0   # smallest latency -> 1 ms
    capped = choose_emulation(lat_only, "auto", "auto", wall_budget_s=50, workload_model_s=1, host_capacity=4e9)
    assert capped.tdf == pytest.approx(50) and "wall budget" in capped.reason
    # with room in the budget, TDF rises to keep the byte scale at 1
    roomy = choose_emulation(pod, "auto", "auto", wall_budget_s=1e5, workload_model_s=1, host_capacity=4e9)
    assert roomy.byte_scale == pytest.approx(1.0) and roomy.tdf == pytest.approx(2.4e12 / 1e9)  # prefill -> 2 decode


def test_carried_rate_bound_follows_the_switch():
    pair, pod = load_topology("pair"), load_topology("pod")
    assert carried_rate_bound_bps(pair, pair.link("prefill0-efa")) == pytest.approx(1.2e12)
    assert carried_rate_bound_bps(pair, pair.link("decode0-efa")) == pytest.approx(1.2e12)
    assert carried_rate_bound_bps(pair, pair.link("client0-fe")) == pytest.approx(10e9)
    # pod: KV leaves a prefill node only toward the two 1.2 Tbit/s decode links, never another prefill node
    assert carried_rate_bound_bps(pod, pod.link("prefill0-efa")) == pytest.approx(2.4e12)
    assert carried_rate_bound_bps(pod, pod.link("decode0-efa")) == pytest.approx(1.2e12)
    assert carried_rate_bound_bps(pod, pod.link("client0-fe")) == pytest.approx(pod.link("client0-fe").params.bandwidth_bps)
    # incast's given dilation (pod, 1/512, TDF 5): 2.4 Tbit/s -> 938 Mbit/s, inside the cap
    assert "EFA link can carry" not in choose_emulation(pod, 5, 1 / 512, host_capacity=4e9).reason
    unshaped = pair.model_copy(update={"links": [lk.model_copy(update={"rails": None, "params": lk.params.model_copy(
        update={"bandwidth_bps": None})}) if lk.name == "decode0-efa" else lk for lk in pair.links]})
    assert carried_rate_bound_bps(unshaped, unshaped.link("prefill0-efa")) == pytest.approx(3.2e12)
    assert carried_rate_bound_bps(unshaped, unshaped.link("decode0-efa")) == pytest.approx(3.2e12)
    # the quickstart's given dilation no longer warns: its busiest EFA link carries 469 Mbit/s
    quick = choose_emulation(pair, 10, 1 / 256, host_capacity=4e9)
    assert "EFA link can carry" not in quick.reason


def test_given_values_are_kept_and_warned_about():
    pair = load_topology("pair")
    c = choose_emulation(pair, 50, "auto", host_capacity=4e9)
    assert c.tdf == 50 and c.byte_scale == pytest.approx(1e9 * 50 / 1.2e12)
    assert "warning" in c.reason                                           # 100 Gbit/s frontend -> 2 Gbit/s
    both = choose_emulation(pair, 400, 1 / 64, host_capacity=4e9)
    assert (both.tdf, both.byte_scale) == (400, 1 / 64) and "given" in both.reason
    t = choose_emulation(pair, "auto", 1 / 64, host_capacity=4e9)
    assert t.tdf == pytest.approx(1e-3 / 7.5e-6) and t.byte_scale == 1 / 64
    with pytest.raises(ValueError, match="tdf"):
        choose_emulation(pair, 0.5, "auto")
    with pytest.raises(ValueError, match="byte_scale"):
        choose_emulation(pair, "auto", 2.0)


def test_host_capacity_cache(tmp_path: Path):
    path = tmp_path / "cap.json"
    assert load_host_capacity(cache_path=path) is None
    entry = {"host_capacity_bps": 1.5e9, "measured_at": time.time(), "kernel": os.uname().release,
             "cpus": os.cpu_count(), "backend": "fallback"}
    path.write_text(json.dumps(entry))
    assert load_host_capacity("fallback", path) == 1.5e9
    assert load_host_capacity("netem", path) is None
    path.write_text(json.dumps(entry | {"measured_at": time.time() - 30 * 86400}))
    assert load_host_capacity(cache_path=path) is None
    path.write_text(json.dumps(entry | {"kernel": "other"}))
    assert load_host_capacity(cache_path=path) is None
    assert rate_cap_bps(None) == 1e9 and rate_cap_bps(1e9) == 5e8


# -- fabric check planning -----------------------------------------------------------------------

def test_routes_cover_every_shaped_link_once_or_more():
    pod = load_topology("pod")
    routes = plan_routes(pod)
    covered = {name for r in routes for name in r.links}
    shaped = {lk.name for lk in pod.rail_links() if lk.cls in ("efa", "frontend")}
    assert covered == shaped                      # every rail of every host: 4 x 16 + 2 x 12 on efa
    efa = [r for r in routes if r.cls == "efa"]
    assert len(efa) == (4 * 16 + 2 * 12) // 2     # each route covers two rails not yet covered
    assert all(len(r.links) == 2 for r in efa)
    front = [r for r in routes if r.cls == "frontend"]
    assert len(front) <= 5                        # pairs share the work: 9 links


def test_passes_bring_every_route_into_the_checked_ranges():
    pair = load_topology("pair")
    c = choose_emulation(pair, "auto", "auto", host_capacity=1.2e9)
    passes = plan_passes(pair, plan_routes(pair), c.tdf, c.byte_scale, rate_cap_bps(1.2e9), extra=True)
    assert passes[0][0].tdf == c.tdf
    for group in passes:
        for p in group:
            assert 1e-3 <= p.rtt_s <= 50e-3, p
            assert p.rate_bps is None or 10e6 <= p.rate_bps <= 600e6 * 1.0001, p
    client = [p for g in passes for p in g if "client0-fe" in p.links]
    assert client and client[0].tdf < c.tdf       # the slow, far client link needs a smaller TDF


def test_judge_tolerances():
    p = Probe("a", "b", "efa", ["l"], 10, 0.1, rate_bps=100e6, rtt_s=0.010, loss=0.0,
              measured={"goodput_bps": 91e6, "rtt_s": 0.0112, "loss": 0.0})
    judge(p)
    assert p.verdicts == {"goodput": "PASS", "rtt": "PASS", "loss": "n/a (loss outside 0.5..5 %)"} and p.ok
    q = Probe("a", "b", "efa", ["l"], 10, 0.1, rate_bps=100e6, rtt_s=0.010, loss=0.01,
              measured={"goodput_bps": 50e6, "rtt_s": 0.0114, "loss": 0.014})
    judge(q)
    assert q.verdicts["goodput"].startswith("n/a") and q.verdicts["rtt"] == "FAIL" and q.verdicts["loss"] == "FAIL"
    assert not q.ok


def test_broken_path_fails_rather_than_errors():
    p = Probe("a", "b", "efa", ["l"], 10, 0.1, rate_bps=100e6, rtt_s=0.010, loss=0.0,
              measured={"rtt_s": None, "goodput_bps": None, "loss": None, "errors": ["ping a->b: no echo"]})
    judge(p)
    assert p.verdicts["rtt"] == "FAIL" and p.verdicts["goodput"] == "FAIL" and not p.ok


def test_probe_outside_tolerance_is_measured_once_more(monkeypatch):
    """A burst of host noise passes on the second measurement; a wrong link fails twice."""
    import fabric.check as check

    probe = check.Probe(src="a", dst="b", cls="efa", links=["a-efa"], tdf=10, byte_scale=1, rate_bps=100e6,
                        rtt_s=5e-3, loss=0.0)
    rtts = iter([7.5e-3, 5.2e-3])                       # noisy once, then within +-10 % + 0.3 ms
    monkeypatch.setattr(check, "measure_rtt", lambda *a: next(rtts))
    monkeypatch.setattr(check, "measure_tcp", lambda *a: 97e6)
    monkeypatch.setattr(check, "measure_udp_loss", lambda *a: (0.0, 1000))
    check.measure_probe(None, probe, 1.0)
    assert probe.ok and probe.measured["rtt_s"] == 5.2e-3 and probe.measured["retried"] == ["rtt_s"]
    slow = check.Probe(**{**probe.__dict__, "measured": {}, "verdicts": {}})
    calls = []
    monkeypatch.setattr(check, "measure_tcp", lambda *a: calls.append(a) or 50e6)   # a link at half its rate
    monkeypatch.setattr(check, "measure_rtt", lambda *a: 5.1e-3)
    check.measure_probe(None, slow, 1.0)
    assert not slow.ok and slow.verdicts["goodput"] == "FAIL" and len(calls) == 2
    assert slow.measured["retried"] == ["goodput_bps"]


def test_loss_free_probe_sends_no_more_packets_than_its_queue_holds(monkeypatch):
    """A stalled iperf3 sender catches up in a burst; on a loss-free path the probe sends at most
    what the path's smallest queue holds, so that burst cannot overflow it (a lossy path keeps
    its duration: it needs the packets)."""
    import fabric.check as check

    pair = load_topology("pair")
    probe = check.expect(pair, plan_routes(pair)[0], 100, 0.1)
    assert probe.queue_packets == 1000                       # the topology's default queue
    calls = []
    monkeypatch.setattr(check, "measure_rtt", lambda *a: probe.rtt_s)
    monkeypatch.setattr(check, "measure_tcp", lambda *a: probe.rate_bps)
    monkeypatch.setattr(check, "measure_udp_loss", lambda *a: calls.append(a) or (0.0, a[8] or 15000))
    small = check.Probe(**{**probe.__dict__, "queue_packets": 300, "measured": {}, "verdicts": {}})
    lossy = check.Probe(**{**probe.__dict__, "loss": 0.01, "measured": {}, "verdicts": {}})
    check.measure_probes(None, [probe, small, lossy], 3.0)
    sent = {c[6]: (c[5], c[8]) for c in calls}               # port -> (duration, packets)
    assert sent[check.IPERF_PORT] == (1.0, 1000 - check.CONTROL_HEADROOM_PACKETS)
    assert sent[check.IPERF_PORT + 1] == (1.0, 300 - check.CONTROL_HEADROOM_PACKETS)
    assert sent[check.IPERF_PORT + 2] == (3.0, None)
    assert check.loss_free_probe_packets(10**6) == check.UDP_TARGET_PPS
    assert check.loss_free_probe_packets(20) == check.LOSS_FREE_MIN_PACKETS
    # the rate is that count over the second, at most half the path's rate
    rate, length = check.udp_probe_shape(probe.rate_bps, 984)
    assert rate <= 0.5 * probe.rate_bps and abs(rate / (8 * length) - 984) < 1


def test_check_text_names_failures_and_the_capacity_behind_the_rates(monkeypatch, capsys):
    import argparse

    import fabric.check as check

    slow = check.Probe("prefill0", "decode0", "efa", ["prefill0-efa", "decode0-efa"], 150, 0.083,
                       rate_bps=667e6, rtt_s=4.5e-3, loss=0.0,
                       measured={"goodput_bps": 500e6, "rtt_s": 4.6e-3, "loss": 0.0, "udp_packets": 5000})
    judge(slow)
    report = {"topology": "pair", "tdf": 150, "byte_scale": 0.083, "reason": "r", "host_capacity_bps": 1.334e9,
              "impairment_backend": "fallback", "passes": [{"tdf": 150, "byte_scale": 0.083, "probes": 1}],
              "ok": False, "duration_s": 9.0, "probes": [slow.__dict__ | {"ok": slow.ok}]}
    monkeypatch.setattr(check, "check_topology", lambda *a: report)
    monkeypatch.setattr(check.os, "geteuid", lambda: 0)
    args = argparse.Namespace(topology="pair", json=False, tdf="auto", byte_scale="auto", prefix="pt",
                              impairment="auto", duration=2.0)
    assert check.run_check(args) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 paths" in out and "outside tolerance: prefill0->decode0 goodput" in out
    assert "host capacity of 1334.0Mbit/s" in out and "--tdf" in out
