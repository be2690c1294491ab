"""Fidelity monitor, in the spirit of Mininet-HiFi: is this run's emulation trustworthy?

During a run a background thread samples, every ``interval_s``:

- each shaped interface's root qdisc (``tc -s -j qdisc show``, one call per namespace): bytes
  sent and the standing queue (backlog packets/bytes), with the rate configured at that moment;
- the host's CPUs (``/proc/stat``).

At the end :func:`evaluate` (a pure function of the samples) marks the run untrustworthy, with
reasons, when

- a backlogged link (a standing queue at both ends of an interval) delivers clearly less than
  its configured rate (median delivered/configured below ``rate_shortfall``): the host, not the
  modelled link, was the bottleneck;
- the CPUs saturate (all cores busy above ``cpu_saturation`` in more than ``cpu_saturated_share``
  of the intervals): every timing in the run is suspect;
- compute steps run late: the median of ``late_s / planned_s`` over the timeline's
  ``step_timing`` events exceeds ``step_error_threshold``, or more than 10 % of the steps are
  later than that (:func:`judge_step_timing`). A heavy tail alone (p99 above 4x the threshold)
  is a warning, not a verdict: steps are scheduled on absolute deadlines, so a late step does
  not delay the ones after it and TTFT/TPOT keep their accuracy; only the ITL tail carries it;
- (fallback backend) a userspace delayer released its packets late on average by more than
  its share of the RTT tolerance: 10 % of its latency + 0.15 ms.

The verdict fails closed: ``trustworthy`` only with measurements behind it. It is
``unmeasured`` (with the reasons) when fewer than two samples were taken, a shaped port was
never sampled, a sample failed (a ``tc`` call that errors is a failed sample, not an empty
one), a delayer could not be read or was never watched (one a fault added after the start is
watched from the sample that first sees it), or the monitor could not start
(:func:`unmeasured_verdict`). Problems found in what was measured make it ``untrustworthy``.
The verdict and a summary of the samples go to ``RUN_DIR/fidelity.json``.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

RATE_SHORTFALL = 0.8
MIN_BACKLOG_PACKETS = 2
MIN_BACKLOGGED_INTERVALS = 3
CPU_SATURATION = 0.95
CPU_SATURATED_SHARE = 0.10
STEP_P99_FACTOR = 4.0
STEP_LATE_SHARE = 0.10
DELAYER_REL_TOL, DELAYER_ABS_TOL_S = 0.10, 0.15e-3
"""Per delayer crossing: half of a round trip's tolerance (two crossings per round trip)."""


@dataclass(frozen=True)
class ShapedPort:
    """One shaped interface: ``intf`` is the Mininet interface (its ``shape`` dict holds the
    current emulated rate), ``pid`` a process in its namespace (None: the root namespace)."""

    link: str
    name: str
    pid: int | None
    intf: Any

    def rate_bps(self) -> float | None:
        shape = getattr(self.intf, "shape", None) or {}
        return shape.get("rate_bps")


def shaped_ports(net: Any) -> list[ShapedPort]:
    """Every rate-shaped interface of a FabricNet (both ends of each shaped link)."""
    ports = []
    for link in getattr(net, "links", []):
        name = getattr(link, "name", None)
        for intf in (link.intf1, link.intf2):
            if (getattr(intf, "shape", None) or {}).get("rate_bps") is None:
                continue
            node = intf.node
            pid = node.pid if getattr(node, "inNamespace", False) else None
            ports.append(ShapedPort(link=name or intf.name, name=intf.name, pid=pid, intf=intf))
    return ports


def read_cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies for each CPU from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                vals = [int(v) for v in line.split()[1:]]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)   # idle + iowait
                total = sum(vals[:8])                                # guest time is inside user
                out.append((total - idle, total))
    return out


def read_qdiscs(pid: int | None) -> dict[str, dict[str, int]]:
    """Root qdisc counters per device in the namespace of ``pid`` (None: the root namespace)."""
    argv = ["tc", "-s", "-j", "qdisc", "show"]
    if pid is not None:
        argv = ["nsenter", "-t", str(pid), "-n", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    if proc.returncode != 0:
        where = "the root namespace" if pid is None else f"the namespace of pid {pid}"
        raise OSError(f"tc qdisc show in {where} failed (exit {proc.returncode}): {proc.stderr.strip()[:200]}")
    return parse_qdiscs(proc.stdout)


def parse_qdiscs(text: str) -> dict[str, dict[str, int]]:
    """Root qdisc counters per device from ``tc -s -j qdisc show`` output (wherever it ran)."""
    if not text.strip():
        return {}
    stats: dict[str, dict[str, int]] = {}
    children: dict[str, list[int]] = {}
    for q in json.loads(text):
        dev = q.get("dev")
        if q.get("root"):
            stats[dev] = {"bytes": int(q.get("bytes", 0)), "backlog_bytes": int(q.get("backlog", 0)),
                          "backlog_packets": int(q.get("qlen", 0)), "drops": int(q.get("drops", 0))}
        else:
            children.setdefault(dev, []).append(int(q.get("qlen", 0)))
    for dev, qlens in children.items():  # classful roots may report only their own direct queue
        if dev in stats:
            stats[dev]["backlog_packets"] = max(stats[dev]["backlog_packets"], sum(qlens))
    return stats


def read_step_errors(run_dir: Path) -> list[float]:
    """``late_s / planned_s`` of every ``step_timing`` event under RUN_DIR/timeline/."""
    errors = []
    for path in sorted((run_dir / "timeline").glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                if '"step_timing"' not in line:
                    continue
                try:
                    ev = json.loads(line)
                    planned, late = float(ev["planned_s"]), float(ev["late_s"])
                except (ValueError, KeyError, TypeError):
                    continue
                if ev.get("event") == "step_timing" and planned > 0:
                    errors.append(max(0.0, late) / planned)
    return errors


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def judge_step_timing(errors: Iterable[float], threshold: float) -> tuple[dict[str, Any], list[str], list[str]]:
    """Compute-step timing (``late_s / planned_s`` per step): summary, reasons, warnings.

    Untrustworthy when the median step is late by more than ``threshold`` or more than
    ``STEP_LATE_SHARE`` of the steps are; a p99 above ``STEP_P99_FACTOR`` x threshold only warns
    that the ITL tail carries that error (deadline scheduling keeps it from accumulating).
    """
    errors = list(errors)
    summary: dict[str, Any] = {"count": len(errors), "median": None, "p99": None, "late_share": None,
                               "threshold": threshold}
    reasons: list[str] = []
    warnings: list[str] = []
    if not errors:
        return summary, reasons, warnings
    median, p99 = statistics.median(errors), _quantile(errors, 0.99)
    late_share = sum(1 for e in errors if e > threshold) / len(errors)
    summary.update(median=median, p99=p99, late_share=late_share)
    if median > threshold:
        reasons.append(f"compute steps late: median timing error {median:.1%} > {threshold:.1%}")
    elif late_share > STEP_LATE_SHARE:
        reasons.append(f"compute steps late: {late_share:.1%} of the steps ran more than {threshold:.0%} late "
                       f"(allowed {STEP_LATE_SHARE:.0%})")
    if p99 > STEP_P99_FACTOR * threshold:
        warnings.append(f"compute step timing tail: p99 error {p99:.1%} of a step; the ITL tail "
                        "percentiles carry it (TTFT and TPOT do not: steps run on absolute deadlines); raise "
                        "the TDF to shrink it")
    return summary, reasons, warnings


VERDICTS = ("trustworthy", "untrustworthy", "unmeasured")
"""What a run's fidelity can be: measured and fine, measured and not, or not (fully) measured."""


def unmeasured_verdict(reason: str) -> dict[str, Any]:
    """fidelity.json for a run whose monitor could not run at all."""
    return {"verdict": "unmeasured", "trustworthy": False, "reasons": [reason], "unmeasured": [reason],
            "warnings": [], "samples": 0, "ports": {}, "delayers": {}}


def evaluate(samples: list[dict[str, Any]], step_errors: Iterable[float] = (), *,
             delayers: Iterable[dict[str, Any]] = (), expected_ports: Iterable[str] = (),
             sampling_errors: Iterable[str] = (), unwatched: Iterable[str] = (),
             step_error_threshold: float = 0.05,
             rate_shortfall: float = RATE_SHORTFALL,
             min_backlog_packets: int = MIN_BACKLOG_PACKETS,
             min_backlogged_intervals: int = MIN_BACKLOGGED_INTERVALS,
             cpu_saturation: float = CPU_SATURATION,
             cpu_saturated_share: float = CPU_SATURATED_SHARE) -> dict[str, Any]:
    """The verdict from samples ``{"t": s, "cpu": [[busy, total], ...], "ports": {name:
    {"link", "rate_bps", "bytes", "backlog_packets", "backlog_bytes", "drops"}}}``, step timing
    errors, and delayer counters over the run ``{"intf", "latency_s", "released",
    "late_total_s", "late_max_s"}``. ``expected_ports`` are the shaped ports that had to be
    sampled, ``sampling_errors`` the samples or counters that failed and ``unwatched`` what
    should have been watched and was not: each makes an otherwise clean run ``unmeasured``."""
    reasons: list[str] = []
    unmeasured: list[str] = []
    if len(samples) < 2:
        unmeasured.append(f"{len(samples)} fidelity sample(s): fewer than two, so no interval was measured")
    errors = list(sampling_errors)
    if errors:
        unmeasured.append(f"{len(errors)} sample(s) or counter reads failed, first: {errors[0]}")
    unmeasured += [f"{what}: not watched by the fidelity monitor" for what in unwatched]
    links: dict[str, dict[str, Any]] = {}
    cpu_busy: list[float] = []
    for prev, cur in zip(samples, samples[1:]):
        dt = cur["t"] - prev["t"]
        if dt <= 0:
            continue
        pairs = list(zip(prev.get("cpu", []), cur.get("cpu", [])))
        total = sum(c[1] - p[1] for p, c in pairs)
        if total > 0:
            cpu_busy.append(sum(c[0] - p[0] for p, c in pairs) / total)
        for name, c in cur.get("ports", {}).items():
            p = prev.get("ports", {}).get(name)
            if p is None:
                continue
            entry = links.setdefault(name, {"link": c.get("link"), "ratios": [], "max_backlog_packets": 0,
                                            "drops": 0, "delivered_bps": []})
            delivered = max(0, c["bytes"] - p["bytes"]) * 8 / dt
            entry["delivered_bps"].append(delivered)
            entry["max_backlog_packets"] = max(entry["max_backlog_packets"], c["backlog_packets"])
            entry["drops"] += max(0, c.get("drops", 0) - p.get("drops", 0))
            rates = [r for r in (p.get("rate_bps"), c.get("rate_bps")) if r]
            if rates and min(p["backlog_packets"], c["backlog_packets"]) >= min_backlog_packets:
                entry["ratios"].append(delivered / min(rates))
    never = sorted(set(expected_ports) - set(links))
    if never and len(samples) >= 2:
        unmeasured.append(f"shaped port(s) never sampled: {', '.join(never)}")
    port_summary = {}
    for name, e in sorted(links.items()):
        ratios = e.pop("ratios")
        delivered = e.pop("delivered_bps")
        e["backlogged_intervals"] = len(ratios)
        e["median_delivered_ratio"] = statistics.median(ratios) if ratios else None
        e["peak_delivered_bps"] = max(delivered) if delivered else 0.0
        if len(ratios) >= min_backlogged_intervals and e["median_delivered_ratio"] < rate_shortfall:
            reasons.append(f"link {e['link']} ({name}): backlogged in {len(ratios)} intervals but delivered "
                           f"only {e['median_delivered_ratio']:.0%} of its configured rate (median)")
        port_summary[name] = e
    saturated = [b for b in cpu_busy if b >= cpu_saturation]
    if cpu_busy and len(saturated) >= 2 and len(saturated) / len(cpu_busy) > cpu_saturated_share:
        reasons.append(f"CPU saturated (>= {cpu_saturation:.0%} busy) in {len(saturated)} of {len(cpu_busy)} "
                       f"intervals")
    step, step_reasons, warnings = judge_step_timing(step_errors, step_error_threshold)
    reasons.extend(step_reasons)
    delayer_summary = {}
    for d in delayers:
        released = d.get("released", 0)
        late_mean = d["late_total_s"] / released if released else None
        delayer_summary[d["intf"]] = {"latency_s": d["latency_s"], "released": released,
                                      "late_mean_s": late_mean, "late_max_s": d.get("late_max_s")}
        tol = DELAYER_REL_TOL * d["latency_s"] + DELAYER_ABS_TOL_S
        if late_mean is not None and late_mean > tol:
            reasons.append(f"delayer on {d['intf']} released {released} packets {late_mean * 1e3:.2f} ms late on "
                           f"average (tolerance {tol * 1e3:.2f} ms): the host could not keep the delay")
    cpu = {"intervals": len(cpu_busy), "mean_busy": statistics.fmean(cpu_busy) if cpu_busy else None,
           "max_busy": max(cpu_busy) if cpu_busy else None, "saturated_intervals": len(saturated)}
    verdict = "untrustworthy" if reasons else "unmeasured" if unmeasured else "trustworthy"
    return {"verdict": verdict, "trustworthy": verdict == "trustworthy", "reasons": reasons + unmeasured,
            "unmeasured": unmeasured, "warnings": warnings, "samples": len(samples),
            "duration_s": samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0.0,
            "cpu": cpu, "ports": port_summary, "step_timing": step, "delayers": delayer_summary}


class FidelityMonitor:
    """Samples a running FabricNet in a background thread; ``stop()`` writes the verdict."""

    def __init__(self, net: Any, run_dir: Path | str, interval_s: float = 0.5,
                 step_error_threshold: float = 0.05, ports: list[ShapedPort] | None = None,
                 delayers: list[Any] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.net = net
        self.run_dir = Path(run_dir)
        self.interval_s = interval_s
        self.step_error_threshold = step_error_threshold
        self.ports = shaped_ports(net) if ports is None else ports
        # the fallback backend's delayers (none on netem)
        self._net_delayers = delayers is None and hasattr(net, "delayers")
        self.delayers = list(net.delayers().values()) if self._net_delayers else list(delayers or [])
        self._delayer_start: dict[int, dict[str, Any] | None] = {}
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "FidelityMonitor":
        self._delayer_start = {id(d): self._delayer_counters(d) for d in self.delayers}
        self._thread = threading.Thread(target=self._loop, name="pdtb-fidelity", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> dict[str, Any]:
        """One sample of every shaped port and the CPUs."""
        t = time.time()
        by_ns: dict[int | None, list[ShapedPort]] = {}
        for port in self.ports:
            by_ns.setdefault(port.pid, []).append(port)
        ports: dict[str, dict[str, Any]] = {}
        for pid, group in by_ns.items():
            stats = read_qdiscs(pid)
            for port in group:
                if port.name in stats:
                    ports[port.name] = {"link": port.link, "rate_bps": port.rate_bps(), **stats[port.name]}
        return {"t": t, "cpu": [list(c) for c in read_cpu_times()], "ports": ports}

    def _delayer_counters(self, delayer: Any) -> dict[str, Any] | None:
        try:
            return delayer.stats()
        except (OSError, RuntimeError, ValueError) as exc:
            self.errors.append(f"delayer {getattr(delayer, 'intf_name', '?')}: {exc}")
            return None

    def _watch_new_delayers(self) -> None:
        """A fault that adds delay or jitter starts a delayer mid-run: watch it from now on."""
        if not self._net_delayers:
            return
        for d in self.net.delayers().values():
            if id(d) not in self._delayer_start:
                self.delayers.append(d)
                self._delayer_start[id(d)] = self._delayer_counters(d)

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self._watch_new_delayers()
                self.samples.append(self.sample())
            except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> dict[str, Any]:
        """Stop sampling, evaluate, write RUN_DIR/fidelity.json and return the verdict."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        delayers = []
        for d in self.delayers:
            end, begin = self._delayer_counters(d), self._delayer_start.get(id(d))
            if end and begin:
                delayers.append({"intf": d.intf_name, "latency_s": d.latency_s,
                                 "released": end["released"] - begin["released"],
                                 "late_total_s": end["late_total_s"] - begin["late_total_s"],
                                 "late_max_s": end["late_max_s"]})
            # else: the failed read is already one of self.errors, which makes the run unmeasured
        unwatched = [f"delayer on {name} (added after the last sample)"
                     for name, d in (self.net.delayers().items() if self._net_delayers else ())
                     if id(d) not in self._delayer_start]
        verdict = evaluate(self.samples, read_step_errors(self.run_dir), delayers=delayers,
                           expected_ports=[p.name for p in self.ports], sampling_errors=self.errors,
                           unwatched=unwatched, step_error_threshold=self.step_error_threshold)
        verdict["interval_s"] = self.interval_s
        verdict["sampling_errors"] = self.errors[:20]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "fidelity.json").write_text(json.dumps(verdict, indent=2) + "\n")
        return verdict
