"""Metrics on hand-made timelines: TTFT/TPOT/ITL/E2E, percentiles, goodput, failures, KV, nodes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from testbed.metrics import compute_summary, goodput, request_records, stats, summarize

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


def ev(t: float, node: str, event: str, rid: str | None = None, **fields) -> dict:
    return {"t_wall": 1000.0 + t, "t_model": t, "node": node, "event": event, "request_id": rid, **fields}


def client_request(rid: str, sent: float, tokens: list[float], prompt: int = 100) -> list[dict]:
    return [ev(sent, "client", "client_sent", rid, prompt_tokens=prompt, output_tokens=len(tokens), scheduled_s=sent),
            ev(tokens[0], "client", "client_first_token", rid),
            ev(tokens[-1], "client", "client_done", rid, output_tokens=len(tokens), token_times=tokens)]


RUN = {"run_id": "t", "scenario": "hand", "tdf": 10.0, "byte_scale": 0.5, "backend": "local",
       "impairment_backend": "fallback", "t0_wall": 1000.0, "slo": {"ttft_ms": 150.0, "tpot_ms": 20.0}}


def test_stats_percentiles_linear() -> None:
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert s == {"count": 11, "mean": 6.0, "p50": 6.0, "p90": 10.0, "p99": pytest.approx(10.9)}
    assert stats([])["p50"] is None and stats([])["count"] == 0
    assert stats([0.002], 1e3)["mean"] == pytest.approx(2.0)


def test_latencies_from_client_events() -> None:
    # r1: sent 0, tokens at 0.1, 0.12, 0.15 -> TTFT 100 ms, E2E 150 ms, TPOT 25 ms, ITL 20, 30 ms
    # r2: sent 1, tokens 1.05, 1.06, 1.07, 1.08 -> TTFT 50 ms, E2E 80, TPOT 10, ITL 10 x3
    events = client_request("r1", 0.0, [0.1, 0.12, 0.15]) + client_request("r2", 1.0, [1.05, 1.06, 1.07, 1.08])
    s = summarize(events, RUN)
    assert s["counts"] == {"total": 2, "completed": 2, "failed": 0, "failed_by_reason": {}}
    assert s["ttft_ms"]["mean"] == pytest.approx(75.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(115.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(17.5)
    assert s["itl_ms"]["count"] == 5
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)
    assert s["itl_ms"]["mean"] == pytest.approx((20 + 30 + 10 * 3) / 5)
    assert s["duration_s"] == pytest.approx(1.08)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(7 / 1.08)
    assert s["throughput"]["requests_per_s"] == pytest.approx(2 / 1.08)
    # r1 misses TPOT (25 > 20), r2 meets both -> DistServe goodput 1 of 2
    assert s["goodput"]["requests"] == 1 and s["goodput"]["share"] == pytest.approx(0.5)
    assert s["goodput"]["rate_per_s"] == pytest.approx(1 / 1.08)
    assert s["goodput"]["ttft_attainment"] == 1.0 and s["goodput"]["tpot_attainment"] == 0.5
    assert s["emulation"] == {"backend": "local", "impairment_backend": "fallback", "tdf": 10.0, "byte_scale": 0.5}
    assert s["time_base"] == "model"


def test_failures_by_reason_and_goodput_counts_them() -> None:
    events = client_request("r1", 0.0, [0.1, 0.11])
    events += [ev(0.2, "client", "client_sent", "r2", prompt_tokens=10, output_tokens=5, scheduled_s=0.2),
               ev(0.5, "client", "client_failed", "r2", reason="http 503")]
    events += [ev(0.3, "client", "client_sent", "r3", prompt_tokens=10, output_tokens=5, scheduled_s=0.3),
               ev(0.4, "router", "failed", "r3", reason="kv_timeout")]
    events += [ev(0.35, "client", "client_sent", "r4", prompt_tokens=10, output_tokens=5, scheduled_s=0.35)]
    s = summarize(events, RUN, expected_ids=["r000005"])
    assert s["counts"]["total"] == 5 and s["counts"]["completed"] == 1 and s["counts"]["failed"] == 4
    assert s["counts"]["failed_by_reason"] == {"http 503": 1, "kv_timeout": 1, "unfinished": 1, "not_sent": 1}
    assert s["goodput"]["share"] == pytest.approx(1 / 5)
    assert s["ttft_ms"]["count"] == 1


def test_failures_count_by_reason_kind() -> None:
    """Details after ': ' (messages, token counts) do not split one cause into many buckets."""
    events = []
    for i, reason in enumerate(["http_400 context_length_exceeded: prompt 130000 + max_tokens 5000",
                                "http_400 context_length_exceeded: prompt 131000 + max_tokens 900",
                                "token_count: received 3 of 5 tokens", "node_crashed:d1"]):
        events += [ev(0.1 * i, "client", "client_sent", f"r{i}", prompt_tokens=10, output_tokens=5, scheduled_s=0.1 * i),
                   ev(0.1 * i + 0.05, "client", "client_failed", f"r{i}", reason=reason)]
    s = summarize(events, RUN)
    assert s["counts"]["failed_by_reason"] == {"http_400 context_length_exceeded": 2, "token_count": 1,
                                               "node_crashed:d1": 1}
    assert request_records(events)[0]["reason"].endswith("max_tokens 5000"), "the full reason stays per request"


def test_real_reason_wins_over_not_sent() -> None:
    """The orchestrator writes ``client_failed`` for requests never sent when a node crashed: that reason counts,
    and those requests (failed at teardown) do not stretch the run's duration."""
    events = client_request("r000000", 0.0, [0.1, 0.2])
    events += [ev(0.5, "client", "client_sent", "r000001", prompt_tokens=10, output_tokens=2, scheduled_s=0.5),
               ev(0.6, "client", "client_failed", "r000001", reason="node_crashed:d1"),
               ev(9.0, "client", "client_failed", "r000002", reason="node_crashed:d1")]
    s = summarize(events, RUN, expected_ids=["r000000", "r000001", "r000002", "r000003"])
    assert s["counts"]["failed_by_reason"] == {"node_crashed:d1": 2, "not_sent": 1}
    assert s["duration_s"] == pytest.approx(0.6)
    assert s["timed_by"] == {"client": 4, "router": 0}


def router_request(rid: str, arrival: float, tokens: list[float], done: float, prompt: int = 100) -> list[dict]:
    """A request a user sent to ``pdtb up``: router and decode node events, no client events."""
    return [ev(arrival, "router", "arrival", rid, prompt_tokens=prompt, max_tokens=len(tokens), stream=True),
            ev(arrival, "router", "routed", rid, prefill="p1", decode="d1"),
            ev(tokens[0], "d1", "first_token", rid),
            ev(tokens[-1], "d1", "decode_done", rid, output_tokens=len(tokens), token_times=tokens),
            ev(done, "router", "done", rid, prompt_tokens=prompt, output_tokens=len(tokens))]


def test_requests_without_client_events_are_timed_by_the_router() -> None:
    """``pdtb up``: no client and no workload; the router's and decode node's events give the latencies."""
    events = [ev(0.0, "router", "node_start", role="router", hardware=None)]
    # r1: arrival 1.0, tokens at the decode node 1.1, 1.12, 1.15, router done 1.16
    events += router_request("user-1", 1.0, [1.1, 1.12, 1.15], 1.16, prompt=300)
    events += [ev(2.0, "router", "arrival", "user-2", prompt_tokens=50, max_tokens=8, stream=False),
               ev(2.0, "router", "routed", "user-2", prefill="p1", decode="d1"),
               ev(2.1, "p1", "failed", "user-2", reason="kv_timeout"),
               ev(2.2, "router", "failed", "user-2", reason="prefill failed: kv_timeout")]
    # refused before its arrival (bad body): a failed request, at the time it came
    events += [ev(2.5, "router", "failed", "req-bad", reason="rejected: could not parse the JSON body", status=400)]
    events += [ev(3.0, "router", "arrival", "user-3", prompt_tokens=50, max_tokens=8, stream=True)]  # in flight
    events += [ev(0.5, "d1", "step_timing", kind="decode", planned_s=0.01, late_s=0.0, batch_size=1)]  # no request
    s = summarize(events, RUN)
    assert s["counts"] == {"total": 4, "completed": 1, "failed": 3, "failed_by_reason": {
        "kv_timeout": 1, "rejected": 1, "unfinished": 1}}
    assert s["timed_by"] == {"client": 0, "router": 4}
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)  # decode node's first token - router arrival
    assert s["e2e_ms"]["p50"] == pytest.approx(160.0)  # router done - router arrival
    assert s["tpot_ms"]["p50"] == pytest.approx(30.0)  # (160 - 100) / 2
    assert s["itl_ms"]["count"] == 2 and s["itl_ms"]["mean"] == pytest.approx(25.0)
    assert s["duration_s"] == pytest.approx(3.0 - 1.0)
    assert s["throughput"]["input_tokens_per_s"] == pytest.approx(300 / 2.0)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(3 / 2.0)
    rec = {r["request_id"]: r for r in request_records(events)}
    assert rec["user-1"]["source"] == "router" and rec["user-1"]["output_tokens_received"] == 3
    assert rec["user-2"]["failed_s"] == pytest.approx(2.2)  # the router's failure, what the user saw
    assert rec["req-bad"]["sent_s"] == pytest.approx(2.5)


def test_client_events_win_over_router_events() -> None:
    """With a load generator, its times stand; a request a user sent alongside is timed by the router."""
    events = client_request("r000000", 0.0, [0.2, 0.3]) + router_request("r000000", 0.01, [0.15, 0.25], 0.26)
    events += router_request("manual", 1.0, [1.05], 1.06)
    s = summarize(events, RUN, expected_ids=["r000000"])
    assert s["timed_by"] == {"client": 1, "router": 1} and s["counts"]["completed"] == 2
    rec = {r["request_id"]: r for r in request_records(events, ["r000000"])}
    assert rec["r000000"]["ttft_s"] == pytest.approx(0.2) and rec["r000000"]["e2e_s"] == pytest.approx(0.3)
    assert rec["manual"]["ttft_s"] == pytest.approx(0.05) and rec["manual"]["tpot_s"] is None


def test_one_token_request_meets_tpot_slo() -> None:
    recs = request_records(client_request("r1", 0.0, [0.1]))
    assert recs[0]["tpot_s"] is None and len(recs[0]["itl_s"]) == 0
    g = goodput(recs, {"ttft_ms": 200.0, "tpot_ms": 1.0}, 1.0)
    assert g["requests"] == 1
    g = goodput(recs, {"ttft_ms": 50.0, "tpot_ms": 1.0}, 1.0)
    assert g["requests"] == 0
    assert goodput(recs, None, 1.0) is None


def test_kv_transfer_and_node_busy_and_queueing() -> None:
    events = client_request("r1", 0.0, [0.5, 0.6]) + client_request("r2", 0.0, [0.7, 0.8])
    events += [ev(0.0, "p1", "node_start", role="prefill", hardware="trn2"),
               ev(0.0, "p1", "prefill_queued", "r1", prompt_tokens=100),
               ev(0.0, "p1", "prefill_queued", "r2", prompt_tokens=100),
               ev(0.1, "p1", "prefill_start", "r1", batch_size=1, batch_tokens=100),
               ev(0.2, "p1", "prefill_end", "r1", compute_s=0.1),
               ev(0.2, "p1", "prefill_start", "r2", batch_size=1, batch_tokens=100),
               ev(0.4, "p1", "prefill_end", "r2", compute_s=0.2),
               ev(0.2, "p1", "kv_start", "r1", decode="d1", mode="whole", bytes=500, model_bytes=1_000_000),
               ev(0.3, "p1", "kv_end", "r1", bytes=500, ok=True),
               ev(0.4, "p1", "kv_start", "r2", decode="d1", mode="whole", bytes=500, model_bytes=1_000_000),
               ev(0.45, "p1", "kv_end", "r2", bytes=0, ok=False, reason="connection reset"),
               ev(0.0, "d1", "node_start", role="decode", hardware="cs3"),
               ev(0.55, "d1", "step_timing", kind="decode", planned_s=0.1, late_s=0.001, batch_size=1),
               ev(0.65, "d1", "step_timing", kind="decode", planned_s=0.1, late_s=0.003, batch_size=1)]
    s = summarize(events, RUN)
    kv = s["kv_transfer"]
    assert kv["count"] == 1 and kv["failed"] == 1 and kv["failed_by_reason"] == {"connection reset": 1}
    assert kv["bytes"] == 500 and kv["model_bytes"] == 1_000_000
    assert kv["time_ms"]["p50"] == pytest.approx(100.0)
    assert kv["achieved_gbps"]["p50"] == pytest.approx(8e6 / 0.1 / 1e9)
    assert kv["exposed_ms"]["p50"] == pytest.approx(100.0)  # kv_start == prefill_end: all of it exposed
    p1, d1 = s["nodes"]["p1"], s["nodes"]["d1"]
    assert p1["role"] == "prefill" and p1["hardware"] == "trn2"
    assert p1["busy_s"] == pytest.approx(0.3) and p1["busy_fraction"] == pytest.approx(0.3 / 0.8)
    assert p1["queue_wait_ms"]["mean"] == pytest.approx(150.0)  # waits 0.1 and 0.2
    assert p1["max_queue_depth"] == 2
    assert d1["busy_s"] == pytest.approx(0.2) and d1["steps"] == 2
    assert d1["step_late_ms"]["p50"] == pytest.approx(2.0)


def test_layerwise_handoff_exposed_after_prefill_only() -> None:
    events = client_request("r1", 0.0, [0.5, 0.6])
    events += [ev(0.1, "p1", "prefill_start", "r1", batch_size=1, batch_tokens=100),
               ev(0.1, "p1", "kv_start", "r1", decode="d1", mode="layerwise", bytes=10, model_bytes=1000),
               ev(0.3, "p1", "prefill_end", "r1", compute_s=0.2),
               ev(0.32, "p1", "kv_end", "r1", bytes=10, ok=True)]
    kv = summarize(events, RUN)["kv_transfer"]
    assert kv["time_ms"]["p50"] == pytest.approx(220.0)
    assert kv["exposed_ms"]["p50"] == pytest.approx(20.0)


def test_fidelity_verdict() -> None:
    events = client_request("r1", 0.0, [0.5, 0.6])
    # 100 steps of 10 ms: 98 on time, 2 late by 5 ms -> median error 0, p99 about 50%: a warning only
    steps = [ev(0.01 * i, "d1", "step_timing", kind="decode", planned_s=0.01, late_s=0.005 if i in (10, 60) else 0.0,
                batch_size=1) for i in range(100)]
    s = summarize(events + steps, RUN)
    assert s["nodes"]["d1"]["step_error"]["median"] == 0.0
    assert s["fidelity"]["verdict"] == "unmeasured" and "d1: " in s["fidelity"]["warnings"][0]
    # 20 of 100 late by 5 ms -> 20 % of the steps late: untrustworthy
    late = [dict(e, late_s=0.005 if i % 5 == 0 else 0.0) for i, e in enumerate(steps)]
    s = summarize(events + late, RUN)
    assert s["fidelity"]["verdict"] == "untrustworthy" and "d1" in s["fidelity"]["reasons"][0]
    ontime = [dict(e, late_s=0.0001) for e in steps]
    f = summarize(events + ontime, RUN)["fidelity"]
    assert f["verdict"] == "unmeasured" and "compute steps ran on time" in f["reasons"]
    assert summarize(events, RUN)["fidelity"]["reasons"] == [
        "no fabric fidelity monitor (fidelity.json): the network was not checked"]
    # the fabric monitor's verdict stands, whatever the steps say
    monitor = {"trustworthy": False, "reasons": ["CPU saturated"], "ports": {
        "qzd0-eth1": {"link": "decode0-efa", "peak_delivered_bps": 9e8, "median_delivered_ratio": 0.5,
                      "max_backlog_packets": 40, "drops": 3, "backlogged_intervals": 7}}}
    f = summarize(events + ontime, RUN, fidelity=monitor)["fidelity"]
    assert f["verdict"] == "untrustworthy" and f["reasons"] == ["CPU saturated"] and f["source"] == "fidelity.json"
    assert f["links"]["qzd0-eth1"] == {"link": "decode0-efa", "peak_delivered_bps": 9e8,
                                       "median_delivered_ratio": 0.5, "max_backlog_packets": 40, "drops": 3}
    assert summarize(events + steps, RUN, fidelity={"trustworthy": True, "reasons": []})["fidelity"]["verdict"] \
        == "trustworthy"


def test_low_load_prediction_check() -> None:
    """Measured vs predicted TTFT/TPOT/E2E of requests that ran alone (run.json ``prediction``)."""
    # r1 and r2 overlap; r3 and r5 run alone; r4 never finishes and overlaps r5's sending
    events = (client_request("r1", 0.0, [0.1, 0.2]) + client_request("r2", 0.05, [0.15, 0.25])
              + client_request("r3", 1.0, [1.04, 1.05, 1.07], prompt=120)
              + client_request("r5", 3.0, [3.06, 3.07, 3.08], prompt=80)
              + client_request("r6", 4.0, [4.05, 4.06]))
    events += [ev(3.9, "client", "client_sent", "r4", prompt_tokens=10, output_tokens=5, scheduled_s=3.9),
               ev(5.0, "client", "client_failed", "r4", reason="timeout")]
    run = dict(RUN, prediction={"ttft_s": 0.05, "tpot_s": 0.01, "e2e_s": 0.07, "prompt_tokens": 100,
                                "output_tokens": 3})
    check = summarize(events, run)["prediction_check"]
    assert check["requests"] == 2  # r3 and r5 (r6 overlaps the unfinished r4)
    # TTFT 40 and 60 ms; TPOT 15 and 10 ms; E2E 70 and 80 ms
    assert check["measured"]["ttft_ms_p50"] == pytest.approx(50.0)
    assert check["measured"]["tpot_ms_p50"] == pytest.approx(12.5)
    assert check["measured"]["e2e_ms_p50"] == pytest.approx(75.0)
    assert check["measured"]["prompt_tokens_p50"] == pytest.approx(100.0)
    assert check["predicted"] == {"ttft_ms": pytest.approx(50.0), "tpot_ms": pytest.approx(10.0),
                                  "e2e_ms": pytest.approx(70.0), "prompt_tokens": 100, "output_tokens": 3}
    assert check["ratio"] == {"ttft": pytest.approx(1.0), "tpot": pytest.approx(1.25), "e2e": pytest.approx(75 / 70)}
    assert summarize(events, RUN)["prediction_check"] is None
    # nothing ran alone: counts and measurements say so, predictions stay
    busy = summarize(client_request("r1", 0.0, [0.1, 0.2]) + client_request("r2", 0.05, [0.15, 0.25]), run)
    assert busy["prediction_check"]["requests"] == 0 and busy["prediction_check"]["measured"]["ttft_ms_p50"] is None
    assert busy["prediction_check"]["ratio"]["ttft"] is None and busy["prediction_check"]["predicted"]["ttft_ms"] == 50


def test_low_load_check_predicts_each_lone_request_at_its_size() -> None:
    """A short lone prompt is compared with the prediction at its own size, not the typical one."""
    events = (client_request("r3", 1.0, [1.04, 1.05, 1.07], prompt=120)
              + client_request("r5", 3.0, [3.06, 3.07, 3.08], prompt=80))
    run = dict(RUN, prediction={"ttft_s": 0.5, "tpot_s": 0.1, "e2e_s": 0.7, "prompt_tokens": 1000,
                                "output_tokens": 3})
    asked: list[tuple[int, int]] = []

    def predictor(prompt: int, output: int) -> dict:
        asked.append((prompt, output))
        return {"ttft_s": prompt / 2000, "tpot_s": 0.01, "e2e_s": prompt / 2000 + 0.02,
                "prompt_tokens": prompt, "output_tokens": output}

    check = summarize(events, run, predictor=predictor)["prediction_check"]
    assert sorted(asked) == [(80, 3), (120, 3)] and check["per_request"] is True
    # r3: TTFT 40 ms vs 60 predicted; r5: 60 ms vs 40 -> ratios 2/3 and 3/2
    assert check["ratio"]["ttft"] == pytest.approx((2 / 3 + 3 / 2) / 2)
    assert check["predicted"]["ttft_ms"] == pytest.approx(50.0) and check["predicted"]["prompt_tokens"] == 100
    assert check["ratio"]["tpot"] == pytest.approx((1.5 + 1.0) / 2)
    assert summarize(events, run)["prediction_check"]["per_request"] is False


def test_compute_summary_reads_run_dir(tmp_path: Path) -> None:
    (tmp_path / "timeline").mkdir()
    with open(tmp_path / "timeline" / "client.jsonl", "w") as f:
        for e in client_request("r000000", 0.0, [0.1, 0.2]):
            f.write(json.dumps(e) + "\n")
        f.write('{"t_wall": 1, "torn')  # a crash mid-write leaves a torn last line
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    (tmp_path / "workload.jsonl").write_text('{"index": 0, "arrival_s": 0, "prompt_tokens": 100, "output_tokens": 2}\n'
                                             '{"index": 1, "arrival_s": 1, "prompt_tokens": 100, "output_tokens": 2}\n')
    (tmp_path / "fidelity.json").write_text(json.dumps({"trustworthy": False, "reasons": ["link saturated"]}))
    s = compute_summary(tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == s
    with open(tmp_path / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["request_id"] for r in rows] == ["r000000", "r000001"]
    assert rows[0]["completed"] == "True" and float(rows[0]["ttft_ms"]) == pytest.approx(100.0)
    assert float(rows[0]["e2e_ms"]) == pytest.approx(200.0) and rows[0]["output_tokens"] == "2"
    assert rows[1]["completed"] == "False" and rows[1]["reason"] == "not_sent" and rows[1]["ttft_ms"] == ""
    assert s["counts"]["total"] == 2 and s["counts"]["failed_by_reason"] == {"not_sent": 1}
    assert s["fidelity"] == {"verdict": "untrustworthy", "reasons": ["link saturated"], "warnings": [],
                             "source": "fidelity.json", "links": {}}
