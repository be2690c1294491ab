"""Run metrics from the timeline: ``RUN_DIR/summary.json`` (schema in docs/summary-schema.md).

Everything is computed in model time from the events of docs/timeline.md. The client's
events define what a user sees (TTFT, TPOT, ITL, E2E); a request no client logged (``pdtb up``
serves requests from a user) is timed from the router's events instead. The router's and
nodes' events explain it (queueing, prefill, KV handoff, decode). The functions below are
pure over lists of event dicts so they can be checked on hand-made timelines.
"""
from __future__ import annotations

import json
import math
from array import array
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import yaml

from fabric.fidelity import judge_step_timing
from core.vocab import COMPUTE_ROLES, request_id
from nodes.timeline import read_timeline
from testbed.runner.rundir import write_atomically, write_csv

SCHEMA = "pdtb.summary/1"
# compute timing checks when no fidelity.json exists use the fabric monitor's judgement
# (fabric.fidelity.judge_step_timing) with its default threshold
STEP_ERROR_THRESHOLD = 0.05
_CLIENT_EVENTS = ("client_sent", "client_first_token", "client_done", "client_failed")


def stats(values: Iterable[float] | np.ndarray, scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 (linear interpolation) of ``values x scale``; None when empty
    (an array is taken as it is: a run's ITLs are millions, too many to pass one by one)."""
    arr = (values if isinstance(values, np.ndarray) else
           np.asarray([v for v in values if v is not None], dtype=float)) * scale
    if arr.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"count": int(arr.size), "mean": float(arr.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99)}


def reason_kind(reason: str) -> str:
    """What a failure reason counts as: its text before the first ': ' (``http_400
    context_length_exceeded``, ``timeout``, ``token_count``), so details such as token counts
    or messages do not split one cause into many buckets. The full reason stays per request."""
    return reason.split(": ", 1)[0]


def _first(evs: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any] | None:
    lst = evs.get(name)
    return min(lst, key=lambda e: e["t_model"]) if lst else None


def _t(e: dict[str, Any] | None) -> float | None:
    return None if e is None else float(e["t_model"])


def _token_times(e: dict[str, Any] | None) -> np.ndarray:
    """An event's ``token_times`` as an array (empty without the event or the field)."""
    times = (e or {}).get("token_times")
    return times if isinstance(times, np.ndarray) else np.asarray([float(t) for t in times or []], dtype=float)


_KEPT_FIELDS: dict[str, tuple[str, ...]] = {
    "client_sent": ("prompt_tokens", "output_tokens"), "client_first_token": (),
    "client_done": ("output_tokens", "token_times"), "client_failed": ("reason",), "failed": ("reason", "node"),
    "arrival": ("prompt_tokens", "max_tokens"), "routed": ("prefill", "decode"), "done": ("prompt_tokens", "output_tokens"),
    "prefill_queued": (), "prefill_start": (), "prefill_end": (), "kv_start": ("bytes", "model_bytes", "mode"),
    "kv_end": ("ok", "bytes", "reason"), "kv_wait_start": (), "kv_granted": (), "kv_hold_wait": (),
    "decode_queued": (), "decode_admitted": (), "first_token": (), "decode_done": ("token_times",),
}
"""The per-request events the records read, and the fields of each they read."""


class RunEvents:
    """What the records and node summaries read from a run's events, gathered in one pass.

    A run's timeline can hold millions of events (a simulated cluster logs every decode step),
    so instead of keeping them all, this keeps per request the first event of each name that
    :func:`request_records` reads (every ``failed``), stripped to the fields it reads with token
    times as arrays, and per node its steps' planned and late times as arrays. Fed the events
    in the order a list holds them, it gives what the list would: the earliest ``t_model`` of a
    name, the first of equal ones."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.routers: set[str] = set()  # nodes that say they are routers at start, or log arrivals
        self.info: dict[str, dict[str, Any]] = {}
        self.prefill: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        self.decode_q: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        self.steps: dict[str, tuple[array, array]] = defaultdict(lambda: (array("d"), array("d")))

    @classmethod
    def of(cls, events: Iterable[dict[str, Any]]) -> "RunEvents":
        run = cls()
        for e in events:
            run.add(e)
        return run

    def add(self, e: dict[str, Any]) -> None:
        node, ev, rid = e.get("node"), e["event"], e.get("request_id")
        if ev == "node_start":
            self.info[node] = {"role": e.get("role"), "hardware": e.get("hardware")}
            if e.get("role") == "router":
                self.routers.add(node)
        elif ev == "step_timing":
            planned, late = self.steps[node]
            planned.append(float(e.get("planned_s") or 0))
            late.append(float(e.get("late_s") or 0))
        elif ev == "arrival":
            self.routers.add(node)
        if rid is None:
            return
        if ev in ("prefill_queued", "prefill_start", "prefill_end"):
            self.prefill[node][rid].setdefault(ev, float(e["t_model"]))
        elif ev in ("decode_queued", "decode_admitted"):
            self.decode_q[node][rid].setdefault(ev, float(e["t_model"]))
        keep = _KEPT_FIELDS.get(ev)
        if keep is None:
            return
        evs = self.requests.setdefault(rid, {})
        kept = evs.get(ev)
        if ev == "failed" or kept is None or e["t_model"] < kept[0]["t_model"]:
            slim = {"t_model": e["t_model"], **{k: e[k] for k in keep if k in e}}
            if "token_times" in slim:
                slim["token_times"] = np.asarray([float(t) for t in slim["token_times"] or []], dtype=float)
            if ev == "failed":
                evs.setdefault(ev, []).append(slim)
            else:
                evs[ev] = [slim]


def _client_timing(evs: dict[str, list[dict[str, Any]]], expected: bool) -> dict[str, Any]:
    """A request's user-side times from the load generator's ``client_*`` events."""
    sent, done, cfail = _first(evs, "client_sent"), _first(evs, "client_done"), _first(evs, "client_failed")
    times = _token_times(done)
    first_token = _t(_first(evs, "client_first_token"))
    rec: dict[str, Any] = {
        "source": "client",
        "prompt_tokens": (sent or {}).get("prompt_tokens"),
        "output_tokens": (sent or {}).get("output_tokens"),
        "sent_s": _t(sent), "first_token_s": first_token, "done_s": _t(done), "failed_s": _t(cfail),
        "completed": done is not None, "token_times": times, "reason": None,
        "_n_out": None if done is None else done.get("output_tokens"),
        "_first_s": float(times[0]) if len(times) else first_token,
        "_last_s": float(times[-1]) if len(times) else _t(done),
    }
    if done is None:
        # the client's (or, at teardown, the orchestrator's) reason wins: a request never sent
        # because a node crashed is ``node_crashed:<node>``, not ``not_sent``
        if cfail is not None:
            rec["reason"] = str(cfail.get("reason") or "client_failed")
        elif evs.get("failed"):
            rec["reason"] = str(_first(evs, "failed").get("reason") or "failed")
        else:
            rec["reason"] = "not_sent" if sent is None and expected else "unfinished"
    return rec


def _router_timing(evs: dict[str, list[dict[str, Any]]], routers: set[str]) -> dict[str, Any]:
    """A request's times when no load generator logged it (``pdtb up``: requests from a user).

    The router logs ``arrival`` and ``done`` / ``failed`` but no per-token times, so TTFT and
    E2E run from its ``arrival`` to the decode (or colocated) node's ``first_token`` and to the
    router's ``done``; the ITLs are the gaps of the node's ``decode_done.token_times``.
    """
    arrival, done = _first(evs, "arrival"), _first(evs, "done")
    fails = evs.get("failed") or []
    router_fails = [e for e in fails if e.get("node") in routers] or fails
    fail = min(router_fails, key=lambda e: e["t_model"]) if router_fails else None
    node_done = _first(evs, "decode_done")
    times = _token_times(node_done if done is not None else None)
    first_token = _t(_first(evs, "first_token"))
    rec: dict[str, Any] = {
        "source": "router",
        "prompt_tokens": (arrival or done or {}).get("prompt_tokens"),
        "output_tokens": (arrival or {}).get("max_tokens"),
        # a request the router refused (bad body, duplicate id) has no arrival: it came when refused
        "sent_s": _t(arrival or fail), "first_token_s": first_token,
        "done_s": _t(done), "failed_s": None if done is not None else _t(fail),
        "completed": done is not None, "token_times": times, "reason": None,
        "_n_out": None if done is None else done.get("output_tokens"),
        "_first_s": first_token if first_token is not None else float(times[0]) if len(times) else None,
        "_last_s": _t(done),
    }
    if done is None:
        rec["reason"] = str(_first(evs, "failed").get("reason") or "failed") if fails else "unfinished"
    return rec


def request_records(events: Iterable[dict[str, Any]] | RunEvents, expected_ids: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One record per request: user-side latencies and the server-side phases (model seconds;
    ``token_times`` and ``itl_s`` as arrays).

    ``expected_ids`` (the workload's request ids) adds requests that the client never sent.
    A request without any ``client_*`` event (one a user sent to ``pdtb up``) is timed from
    the router's events instead (``source: "router"``).
    """
    run = events if isinstance(events, RunEvents) else RunEvents.of(events)
    grouped, routers = run.requests, run.routers
    expected = set(expected_ids)
    records = []
    for rid in sorted(set(grouped) | expected):
        evs = grouped.get(rid, {})
        has_client = any(evs.get(name) for name in _CLIENT_EVENTS)
        refused = any(e.get("node") in routers for e in evs.get("failed") or [])
        if not (has_client or evs.get("arrival") or refused or rid in expected):
            continue  # not a request that reached the router or came from the workload
        if has_client or rid in expected:
            rec = {"request_id": rid, **_client_timing(evs, rid in expected)}
        else:
            rec = {"request_id": rid, **_router_timing(evs, routers)}
        n_out, first, last = rec.pop("_n_out"), rec.pop("_first_s"), rec.pop("_last_s")
        rec.update({"ttft_s": None, "tpot_s": None, "e2e_s": None, "itl_s": np.empty(0)})
        if rec["completed"] and rec["sent_s"] is not None:
            times = rec["token_times"]
            n_out = int(n_out if n_out is not None else len(times))
            rec["output_tokens_received"] = n_out
            if first is not None:
                rec["ttft_s"] = first - rec["sent_s"]
            if last is not None:
                rec["e2e_s"] = last - rec["sent_s"]
            if n_out > 1 and rec["ttft_s"] is not None and rec["e2e_s"] is not None:
                rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (n_out - 1)
            rec["itl_s"] = np.diff(times)
        routed = _first(evs, "routed") or {}
        kv_start, kv_end = _first(evs, "kv_start"), _first(evs, "kv_end")
        rec.update({
            "arrival_s": _t(_first(evs, "arrival")),
            "prefill_node": routed.get("prefill"), "decode_node": routed.get("decode"),
            "prefill_queued_s": _t(_first(evs, "prefill_queued")),
            "prefill_start_s": _t(_first(evs, "prefill_start")), "prefill_end_s": _t(_first(evs, "prefill_end")),
            "kv_start_s": _t(kv_start), "kv_end_s": _t(kv_end),
            # backpressure: the decode node refused the transfer for want of KV room until the
            # grant; the prefill node held the prompt back for want of room for its KV
            "kv_wait_start_s": _t(_first(evs, "kv_wait_start")), "kv_granted_s": _t(_first(evs, "kv_granted")),
            "kv_hold_wait_s": _t(_first(evs, "kv_hold_wait")),
            "kv_ok": None if kv_end is None else bool(kv_end.get("ok", True)),
            "kv_bytes": (kv_end or kv_start or {}).get("bytes"),
            "kv_model_bytes": (kv_start or {}).get("model_bytes"),
            "kv_mode": (kv_start or {}).get("mode"),
            "kv_reason": (kv_end or {}).get("reason"),
            "decode_queued_s": _t(_first(evs, "decode_queued")),
            "decode_admitted_s": _t(_first(evs, "decode_admitted")),
            "decode_first_token_s": _t(_first(evs, "first_token")),
            "decode_done_s": _t(_first(evs, "decode_done")),
        })
        records.append(rec)
    return records


def run_window(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Model time from the first request sent to the last sent request finished (or failed).

    A request never sent does not stretch the window (its failure is written at teardown)."""
    sent = [r for r in records if r["sent_s"] is not None]
    starts = [r["sent_s"] for r in sent]
    ends = [t for r in sent for t in (r["done_s"], r["failed_s"]) if t is not None]
    if not starts:
        return None, None
    return min(starts), max(ends + starts)


def goodput(records: list[dict[str, Any]], slo: dict[str, float] | None, duration_s: float | None) -> dict[str, Any] | None:
    """DistServe goodput: requests meeting both the TTFT and the TPOT SLO, as a share and a rate.

    Failed requests count in the total and never meet an SLO; a one-token request has no
    TPOT and meets the TPOT SLO trivially.
    """
    if not slo:
        return None
    total = len(records)
    ttft_ok = [r for r in records if r["completed"] and r["ttft_s"] is not None and r["ttft_s"] * 1e3 <= slo["ttft_ms"]]
    tpot_ok = [r for r in records if r["completed"] and (r["tpot_s"] is None or r["tpot_s"] * 1e3 <= slo["tpot_ms"])]
    both = {r["request_id"] for r in ttft_ok} & {r["request_id"] for r in tpot_ok}
    return {
        "requests": len(both),
        "share": len(both) / total if total else None,
        "rate_per_s": len(both) / duration_s if duration_s else None,
        "ttft_attainment": len(ttft_ok) / total if total else None,
        "tpot_attainment": len(tpot_ok) / total if total else None,
    }


def kv_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """KV handoffs: how many, how big, how long, how fast (model time, modelled bytes)."""
    ok = [r for r in records if r["kv_ok"] and r["kv_start_s"] is not None and r["kv_end_s"] is not None]
    failed = [r for r in records if r["kv_ok"] is False]
    durations = [r["kv_end_s"] - transfer_start_s(r) for r in ok]
    rates = [8 * r["kv_model_bytes"] / d / 1e9 for r, d in zip(ok, durations) if d > 0 and r["kv_model_bytes"]]
    model_bytes = sum(int(r["kv_model_bytes"] or 0) for r in ok)
    busy = sum(d for d in durations if d > 0)
    time_ms = stats(durations, 1e3)
    # what the handoff adds after the request's prefill ends (a layerwise handoff starts earlier)
    exposed_ms = stats((r["kv_end_s"] - max(r["kv_start_s"], r["prefill_end_s"]) for r in ok
                        if r["prefill_end_s"] is not None), 1e3)
    return {
        "count": len(ok),
        "failed": len(failed),
        "failed_by_reason": dict(Counter(reason_kind(str(r["kv_reason"] or "unknown")) for r in failed)),
        "bytes": sum(int(r["kv_bytes"] or 0) for r in ok),
        "model_bytes": model_bytes,
        "time_ms": {k: time_ms[k] for k in ("mean", "p50", "p90", "p99")},
        "exposed_ms": {k: exposed_ms[k] for k in ("mean", "p50", "p90", "p99")},
        "achieved_gbps": {"mean": float(np.mean(rates)) if rates else None,
                          "p50": float(np.median(rates)) if rates else None,
                          "aggregate": 8 * model_bytes / busy / 1e9 if busy > 0 else None},
        "backpressure": backpressure_summary(records),
    }


def transfer_start_s(record: dict[str, Any]) -> float:
    """When a handoff's bytes began to flow: at the decode node's grant when it made it wait."""
    waited = record["kv_wait_start_s"] is not None and record["kv_granted_s"] is not None
    return record["kv_granted_s"] if waited else record["kv_start_s"]


def kv_wait_s(record: dict[str, Any]) -> float | None:
    """How long the decode node's refusals (no KV room) delayed the handoff, granted or not."""
    end = record["kv_granted_s"] if record["kv_granted_s"] is not None else record["kv_end_s"]
    return None if record["kv_wait_start_s"] is None or end is None else end - record["kv_wait_start_s"]


def kv_hold_s(record: dict[str, Any]) -> float | None:
    """How long the prefill node held the prompt back because its KV memory was full."""
    if record["kv_hold_wait_s"] is None or record["prefill_start_s"] is None:
        return None
    return record["prefill_start_s"] - record["kv_hold_wait_s"]


def backpressure_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """KV memory backpressure: requests whose handoff waited for the decode node's room, and
    requests whose prefill waited for room on the prefill node (model ms)."""
    waits = [w for w in map(kv_wait_s, records) if w is not None]
    holds = [h for h in map(kv_hold_s, records) if h is not None]
    return {"decode_refused": len(waits), "decode_wait_ms": stats(waits, 1e3),
            "prefill_held": len(holds), "prefill_hold_ms": stats(holds, 1e3)}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _queue_depth_max(pairs: list[tuple[float, float | None]]) -> int:
    """Most requests waiting at once, from (queued, left the queue) times; None = never left."""
    steps = [(q, 1) for q, _ in pairs] + [(s, -1) for _, s in pairs if s is not None]
    depth = best = 0
    for _, d in sorted(steps, key=lambda x: (x[0], x[1])):
        depth += d
        best = max(best, depth)
    return best


def node_summary(events: Iterable[dict[str, Any]] | RunEvents,
                 window: tuple[float | None, float | None]) -> dict[str, dict[str, Any]]:
    """Per compute node: busy fraction of the run window, queueing and step lateness."""
    run = events if isinstance(events, RunEvents) else RunEvents.of(events)
    info, prefill, decode_q, steps = run.info, run.prefill, run.decode_q, run.steps
    start, end = window
    span = (end - start) if start is not None and end is not None and end > start else None
    out: dict[str, dict[str, Any]] = {}
    compute = {n for n, i in info.items() if i.get("role") in COMPUTE_ROLES}
    for node in sorted(compute | set(prefill) | set(decode_q) | set(steps)):
        intervals = [(p["prefill_start"], p["prefill_end"]) for p in prefill[node].values()
                     if "prefill_start" in p and "prefill_end" in p]
        # steps run back to back on planned deadlines, so their planned lengths are the busy time;
        # a node that logs no steps is busy while a prefill batch runs
        planned, late = steps[node] if node in steps else ((), ())
        if planned:
            busy = sum(planned)
        else:
            busy = _union_length(intervals)
        waits, pairs = [], []
        for table, enter, leave in ((prefill[node], "prefill_queued", "prefill_start"),
                                    (decode_q[node], "decode_queued", "decode_admitted")):
            for p in table.values():
                if enter in p:
                    pairs.append((p[enter], p.get(leave)))
                    if leave in p:
                        waits.append(p[leave] - p[enter])
        errors = [max(lt, 0.0) / pl for lt, pl in zip(late, planned) if pl > 0]
        out[node] = {
            **info.get(node, {"role": None, "hardware": None}),
            "busy_s": busy,
            "busy_fraction": min(busy / span, 1.0) if span else None,
            "queue_wait_ms": stats(waits, 1e3),
            "max_queue_depth": _queue_depth_max(pairs),
            "steps": len(planned),
            "step_planned_ms_p50": float(np.median(planned)) * 1e3 if planned else None,
            "step_late_ms": {"p50": float(np.percentile(late, 50)) * 1e3 if late else None,
                             "p99": float(np.percentile(late, 99)) * 1e3 if late else None,
                             "max": max(late) * 1e3 if late else None},
            "step_error": _step_error(errors),
        }
    return out


def _step_error(errors: list[float]) -> dict[str, Any]:
    summary, reasons, warnings = judge_step_timing(errors, STEP_ERROR_THRESHOLD)
    return {**summary, "reasons": reasons, "warnings": warnings}


def fidelity_verdict(fidelity: dict[str, Any] | None, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Is the run trustworthy? ``trustworthy`` | ``untrustworthy`` | ``unmeasured``.

    With the fabric's fidelity monitor (``fidelity.json``: links delivering their rate, CPUs,
    step timing) its verdict stands. Without it (the local backend has no emulated links)
    only compute timing can be judged: late steps make the run untrustworthy, on-time steps
    leave it unmeasured. Never trustworthy without measurements.
    """
    if fidelity:
        if "verdict" in fidelity:
            verdict = str(fidelity["verdict"])
        else:
            verdict = "trustworthy" if fidelity.get("trustworthy") is True else "untrustworthy"
        links = {name: {k: p.get(k) for k in ("link", "peak_delivered_bps", "median_delivered_ratio",
                                              "max_backlog_packets", "drops")}
                 for name, p in (fidelity.get("ports") or {}).items()}
        return {"verdict": verdict, "reasons": [str(r) for r in fidelity.get("reasons") or []],
                "warnings": [str(w) for w in fidelity.get("warnings") or []],
                "source": "fidelity.json", "links": links}
    timed = {name: n["step_error"] for name, n in nodes.items() if (n.get("step_error") or {}).get("median") is not None}
    late = [f"{name}: {r}" for name, err in timed.items() for r in err["reasons"]]
    warnings = [f"{name}: {w}" for name, err in timed.items() for w in err["warnings"]]
    if late:
        return {"verdict": "untrustworthy", "source": None, "links": {}, "warnings": warnings,
                "reasons": late + ["the host could not keep the dilated timing; raise the TDF"]}
    reasons = ["no fabric fidelity monitor (fidelity.json): the network was not checked"]
    if timed:
        reasons.append("compute steps ran on time")
    return {"verdict": "unmeasured", "source": None, "links": {}, "reasons": reasons, "warnings": warnings}


SizePredictor = Callable[[int, int], dict[str, Any]]
"""``(prompt_tokens, output_tokens) -> Prediction.to_dict()``: the analytic request at that size."""

PREDICTED_SAMPLE = 200
"""At most this many lone requests get their own prediction (spread evenly by send time)."""


def _median_ms(values: list[float]) -> float | None:
    return float(np.median(values)) * 1e3 if values else None


def _in_flight_counts(spans: list[tuple[float, float | None]], windows: list[tuple[float, float]]) -> list[int]:
    """For each window (sent, done): how many spans (sent, ended or None: never) overlap it,
    ``s < done and (e is None or e > sent)``, by sorted counts instead of a scan per window:
    the spans that start before ``done`` less those of them that ended by ``sent``."""
    starts = np.sort(np.asarray([s for s, _ in spans], dtype=float))
    ordered = [(s, e) for s, e in spans if e is not None and s <= e]  # ended by sent implies started before done
    odd = [(s, e) for s, e in spans if e is not None and s > e]        # ended before it started: counted one by one
    ends = np.sort(np.asarray([e for _, e in ordered], dtype=float))
    out = []
    for sent, done in windows:
        if not sent < done:  # an empty window: the shortcut's premise fails, so count directly
            out.append(sum(1 for s, e in spans if s < done and (e is None or e > sent)))
            continue
        n = int(np.searchsorted(starts, done, side="left")) - int(np.searchsorted(ends, sent, side="right"))
        out.append(n - sum(1 for s, e in odd if s < done and e <= sent))
    return out


def low_load_check(records: list[dict[str, Any]], prediction: dict[str, Any] | None,
                   predictor: SizePredictor | None = None) -> dict[str, Any] | None:
    """Measured vs predicted for requests that ran alone (no other request in flight at the client).

    With ``predictor`` each lone request is compared with the prediction at its own size (a
    short lone prompt is not held against the typical one) and ``ratio`` is the median of the
    per-request ratios; without it, the medians are compared with the run's typical prediction.
    """
    if not prediction:
        return None
    done = [r for r in records if r["completed"] and r["sent_s"] is not None and r["done_s"] is not None]
    # a request that never finished counts as in flight from its sending to the end of the run
    spans = [(r["sent_s"], r["done_s"] if r["done_s"] is not None else r["failed_s"])
             for r in records if r["sent_s"] is not None]
    alone = [r for r, n in zip(done, _in_flight_counts(spans, [(r["sent_s"], r["done_s"]) for r in done])) if n == 1]
    sized = [r for r in alone if r["prompt_tokens"] and r.get("output_tokens_received")]
    per_request = predictor is not None and bool(sized)
    if per_request:
        sized = sized[::max(1, math.ceil(len(sized) / PREDICTED_SAMPLE))]
        own = [predictor(int(r["prompt_tokens"]), int(r["output_tokens_received"])) for r in sized]
    out: dict[str, Any] = {"requests": len(alone), "per_request": per_request, "measured": {}, "predicted": {},
                           "ratio": {}}
    for key in ("ttft", "tpot", "e2e"):
        if per_request:
            pairs = [(r[f"{key}_s"], p.get(f"{key}_s")) for r, p in zip(sized, own)]
            pairs = [(m, p) for m, p in pairs if m is not None and p]
            m, p = _median_ms([m for m, _ in pairs]), _median_ms([p for _, p in pairs])
            ratio = float(np.median([m / p for m, p in pairs])) if pairs else None
        else:
            m = _median_ms([r[f"{key}_s"] for r in alone if r[f"{key}_s"] is not None])
            pred = prediction.get(f"{key}_s")
            p = pred * 1e3 if pred is not None else None
            ratio = m / p if m is not None and p else None
        out["measured"][f"{key}_ms_p50"] = m
        out["predicted"][f"{key}_ms"] = p
        out["ratio"][key] = ratio
    sizes = [r["prompt_tokens"] for r in alone if r["prompt_tokens"] is not None]
    out["measured"]["prompt_tokens_p50"] = float(np.median(sizes)) if sizes else None
    if per_request:
        out["predicted"]["prompt_tokens"] = float(np.median([p["prompt_tokens"] for p in own]))
        out["predicted"]["output_tokens"] = float(np.median([p["output_tokens"] for p in own]))
    else:
        out["predicted"]["prompt_tokens"] = prediction.get("prompt_tokens")
        out["predicted"]["output_tokens"] = prediction.get("output_tokens")
    return out


def scenario_predictor(run_dir: Path, run: dict[str, Any]) -> SizePredictor | None:
    """``pdtb predict`` at any request size from the run's ``scenario.yaml`` (None when that
    cannot be loaded, e.g. a run directory of an older version or without profiles)."""
    from core.config import ConfigError
    from fabric.topology import load_topology
    from testbed.config.scenario import check_references, scenario_from_data
    from testbed.predict import predict

    path = run_dir / "scenario.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        data.pop("kind", None)
        sc = scenario_from_data(data, str(path), run_dir)
        check_references(sc)  # its topology and profiles load: predict() will not fail on them
    except (OSError, yaml.YAMLError, AttributeError, ConfigError):
        return None
    byte_scale = run.get("byte_scale")
    topo = load_topology(sc.topology_ref())

    @lru_cache(maxsize=None)
    def at(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        return predict(sc, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                       byte_scale=byte_scale, topo=topo).to_dict()
    return at


def summarize(events: Iterable[dict[str, Any]] | RunEvents, run: dict[str, Any], fidelity: dict[str, Any] | None = None,
              expected_ids: Iterable[str] = (), records: list[dict[str, Any]] | None = None,
              predictor: SizePredictor | None = None) -> dict[str, Any]:
    """summary.json's content from a run's events, its run.json and its fidelity.json
    (``records``: the events' request_records when the caller already has them; ``predictor``:
    predictions at each lone request's own size, see :func:`low_load_check`)."""
    if not isinstance(events, RunEvents):
        events = RunEvents.of(events)
    if records is None:
        records = request_records(events, expected_ids)
    start, end = run_window(records)
    duration = (end - start) if start is not None and end is not None else None
    completed = [r for r in records if r["completed"]]
    failed = [r for r in records if not r["completed"]]
    slo = run.get("slo")
    nodes = node_summary(events, (start, end))
    out_tokens = sum(int(r.get("output_tokens_received") or 0) for r in completed)
    in_tokens = sum(int(r["prompt_tokens"] or 0) for r in completed)
    return {
        "schema": SCHEMA,
        "time_base": "model",
        "run_id": run.get("run_id"),
        "scenario": run.get("scenario"),
        "sweep_point": run.get("sweep_point") or {},
        "duration_s": duration,
        "counts": {"total": len(records), "completed": len(completed), "failed": len(failed),
                   "failed_by_reason": dict(Counter(reason_kind(r["reason"]) for r in failed))},
        # where each request's times come from: the load generator, or the router (pdtb up)
        "timed_by": {src: sum(1 for r in records if r["source"] == src) for src in ("client", "router")},
        "ttft_ms": stats((r["ttft_s"] for r in completed), 1e3),
        "tpot_ms": stats((r["tpot_s"] for r in completed), 1e3),
        "itl_ms": stats(np.concatenate([r["itl_s"] for r in completed] or [np.empty(0)]), 1e3),
        "e2e_ms": stats((r["e2e_s"] for r in completed), 1e3),
        "throughput": {
            "output_tokens_per_s": out_tokens / duration if duration else None,
            "input_tokens_per_s": in_tokens / duration if duration else None,
            "requests_per_s": len(completed) / duration if duration else None,
        },
        "slo": slo,
        "goodput": goodput(records, slo, duration),
        "kv_transfer": kv_summary(records),
        "nodes": nodes,
        "emulation": {k: run.get(k) for k in ("backend", "impairment_backend", "tdf", "byte_scale")},
        "fidelity": fidelity_verdict(fidelity, nodes),
        "prediction_check": low_load_check(records, run.get("prediction"), predictor),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def expected_request_ids(run_dir: Path) -> list[str]:
    """Request ids of the run's workload.jsonl (``r{index:06d}``), or none if it is absent."""
    path = run_dir / "workload.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [request_id(int(json.loads(line)["index"])) for line in f if line.strip()]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _span_ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else _ms(end - start)


REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id", "source", "completed", "reason", "prompt_tokens", "output_tokens", "sent_s",
    "ttft_ms", "tpot_ms", "e2e_ms", "prefill_node", "decode_node", "prefill_queue_ms", "prefill_ms",
    "kv_mode", "kv_bytes", "kv_model_bytes", "kv_hold_ms", "kv_wait_ms", "kv_ms", "decode_wait_ms")
"""``requests.csv``'s columns (model time), documented in docs/summary-schema.md."""


def request_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per request for ``requests.csv``: what a per-request export of a serving
    benchmark holds, plus where the request's time went on the server side."""
    return [{
        "request_id": r["request_id"], "source": r["source"], "completed": r["completed"], "reason": r["reason"],
        "prompt_tokens": r["prompt_tokens"], "output_tokens": r.get("output_tokens_received", r["output_tokens"]),
        "sent_s": r["sent_s"], "ttft_ms": _ms(r["ttft_s"]), "tpot_ms": _ms(r["tpot_s"]), "e2e_ms": _ms(r["e2e_s"]),
        "prefill_node": r["prefill_node"], "decode_node": r["decode_node"],
        "prefill_queue_ms": _span_ms(r["prefill_queued_s"], r["prefill_start_s"]),
        "prefill_ms": _span_ms(r["prefill_start_s"], r["prefill_end_s"]),
        "kv_mode": r["kv_mode"], "kv_bytes": r["kv_bytes"], "kv_model_bytes": r["kv_model_bytes"],
        "kv_hold_ms": _ms(kv_hold_s(r)), "kv_wait_ms": _ms(kv_wait_s(r)),
        "kv_ms": _span_ms(transfer_start_s(r), r["kv_end_s"]) if r["kv_start_s"] is not None else None,
        "decode_wait_ms": _span_ms(r["decode_queued_s"], r["decode_admitted_s"]),
    } for r in records]


def run_events(run_dir: str | Path) -> RunEvents:
    """A run directory's timeline, streamed file by file into what the summary reads."""
    return RunEvents.of(e for path in sorted((Path(run_dir) / "timeline").glob("*.jsonl")) for e in read_timeline(path))


def run_request_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """``requests.csv``'s rows computed from a run directory's timeline (also while it runs)."""
    run_dir = Path(run_dir)
    return request_rows(request_records(run_events(run_dir), expected_request_ids(run_dir)))


def summarize_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a run directory, write ``summary.json`` and ``requests.csv`` into it; returns the
    summary and the request records (for a report written next, without reading the run again)."""
    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json") or {}
    fidelity = _read_json(run_dir / "fidelity.json")
    events = run_events(run_dir)
    records = request_records(events, expected_request_ids(run_dir))
    summary = summarize(events, run, fidelity, records=records, predictor=scenario_predictor(run_dir, run))
    write_csv(run_dir / "requests.csv", REQUEST_COLUMNS,
              [[row[c] for c in REQUEST_COLUMNS] for row in request_rows(records)])
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary, records


def compute_summary(run_dir: str | Path) -> dict[str, Any]:
    """Read a run directory, write ``summary.json`` and ``requests.csv`` into it and return the summary."""
    return summarize_run(run_dir)[0]
