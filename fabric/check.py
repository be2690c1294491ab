"""``pdtb fabric check TOPOLOGY``: does the emulated fabric do what its configuration says?

Builds the topology, then for every shaped link measures a host-to-host path through it:
TCP goodput (iperf3), UDP loss (iperf3 at a rate below the path's) and round-trip time (ping),
and compares them with the configured DILATED values (docs/fidelity.md):

- TCP goodput >= 90 % of the path's bottleneck rate, for rates of 10 Mbit/s .. 1 Gbit/s and
  loss-free paths (a lossy path's TCP rate is set by its loss, not its link rate);
- RTT within +-(10 % + 0.3 ms) for round trips of 1 .. 50 ms;
- UDP loss within +-30 % (relative) for 0.5 .. 5 % loss.

Values outside those ranges are measured and shown but not judged. TDF and byte scale are
chosen per topology (:func:`fabric.dilation.choose_emulation`) unless given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from fabric.topology import RailLink, TopologyConfig, find_path, load_topology
from core.vocab import SCALED_NETWORKS

GOODPUT_MIN_RATIO = 0.90
RATE_RANGE_BPS = (10e6, 1e9)
RTT_REL_TOL, RTT_ABS_TOL_S = 0.10, 0.3e-3
RTT_RANGE_S = (1e-3, 50e-3)
LOSS_REL_TOL = 0.30
LOSS_RANGE = (0.005, 0.05)
CHECK_NETWORKS = ("efa", "frontend")
UDP_TARGET_PPS = 5000
"""UDP probe packets per second: ~15 000 in 3 s put a 0.5 % loss's +-30 % band at ~2.6 sigma."""
CONTROL_HEADROOM_PACKETS = 16
"""Queue places a loss-free probe leaves to iperf3's control connection, which shares the path."""
LOSS_FREE_MIN_PACKETS = 100
IPERF_PORT = 5301

_ECHO_RE = re.compile(r"icmp_seq=(\d+) .*?time=([\d.]+) ms")


class MeasureError(RuntimeError):
    """A measurement tool failed or printed something unexpected."""


@dataclass(frozen=True)
class Route:
    """A host pair (a rail of each, on a network with rails) to measure on one network, and the
    emulated links its packets cross."""

    src: str
    dst: str
    cls: str
    links: tuple[str, ...]
    src_rail: int = 0
    dst_rail: int = 0


@dataclass
class Probe:
    """One measured route under one dilation, with the configured (dilated) expectations."""

    src: str
    dst: str
    cls: str
    links: list[str]
    tdf: float
    byte_scale: float
    rate_bps: float | None
    rtt_s: float
    loss: float
    src_rail: int = 0
    dst_rail: int = 0
    queue_packets: int = 1000
    measured: dict[str, Any] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v != "FAIL" for v in self.verdicts.values())


def _shaped(lk: RailLink) -> bool:
    p = lk.params
    return p.bandwidth_bps is not None or p.latency_s > 0 or p.jitter_s > 0 or p.loss > 0


def plan_routes(topo: TopologyConfig) -> list[Route]:
    """Host pairs (rail pairs where hosts have rails) whose paths cover every shaped link and
    rail of the checked networks: greedily the pair crossing the most not-yet-covered shaped
    links (then the shorter path), until all are."""
    routes = []
    rail_links = topo.rail_links()
    hosts = {h.name for h in topo.hosts}
    for cls in CHECK_NETWORKS:
        links = [lk for lk in rail_links if lk.cls == cls]
        shaped = {lk.name for lk in links if _shaped(lk)}
        members = [h.name for h in topo.hosts if topo.host_link(h.name, cls) is not None]
        ends = {m: sorted({lk.rail for lk in links if m in (lk.a, lk.b)}) for m in members}
        candidates = []
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                for ra in ends[a]:
                    for rb in ends[b]:
                        sub = [lk for lk in links if not (a in (lk.a, lk.b) and lk.rail != ra)
                               and not (b in (lk.a, lk.b) and lk.rail != rb)]
                        try:
                            path = find_path(sub, a, b, cls, hosts)
                        except KeyError:
                            continue
                        candidates.append(Route(a, b, cls, tuple(lk.name for lk in path), ra, rb))
        while shaped and candidates:
            best = max(candidates, key=lambda r: (len(shaped.intersection(r.links)), -len(r.links)))
            if not shaped.intersection(best.links):
                break
            routes.append(best)
            shaped -= set(best.links)
    return routes


def expect(topo: TopologyConfig, route: Route, tdf: float, byte_scale: float) -> Probe:
    """The probe of ``route`` under a dilation: bottleneck rate, round trip and one-way loss of
    its path, as the fabric emulates them."""
    from fabric.topo import Dilation

    dil = Dilation(tdf, byte_scale)
    by_name = {lk.name: lk for lk in topo.rail_links()}
    emu = [dil.link(by_name[name].params, route.cls) for name in route.links]
    rates = [e["rate_bps"] for e in emu if e["rate_bps"] is not None]
    return Probe(src=route.src, dst=route.dst, cls=route.cls, links=list(route.links), tdf=tdf,
                 byte_scale=byte_scale, rate_bps=min(rates) if rates else None,
                 rtt_s=2.0 * math.fsum(e["latency_s"] for e in emu),
                 loss=1.0 - math.prod(1.0 - e["loss"] for e in emu), src_rail=route.src_rail,
                 dst_rail=route.dst_rail, queue_packets=min(e["queue_packets"] for e in emu))


def _in_range(probe: Probe, cap_bps: float) -> bool:
    rate_ok = probe.rate_bps is None or RATE_RANGE_BPS[0] <= probe.rate_bps <= min(cap_bps, RATE_RANGE_BPS[1])
    rtt_ok = probe.rtt_s == 0 or RTT_RANGE_S[0] <= probe.rtt_s <= RTT_RANGE_S[1]
    return rate_ok and rtt_ok


def _feasible_tdf(topo: TopologyConfig, route: Route, cap_bps: float) -> tuple[float, float, float | None]:
    """(low, high, model bottleneck rate of a byte-scaled route or None): the TDFs that put the
    route's round trip in 1..50 ms and its rate in 10 Mbit/s..cap (byte scale free on EFA)."""

    model = expect(topo, route, 1.0, 1.0)
    lo, hi = 1.0, math.inf
    if model.rtt_s > 0:
        lo, hi = max(lo, RTT_RANGE_S[0] / model.rtt_s), min(hi, RTT_RANGE_S[1] / model.rtt_s)
    scaled = None
    if model.rate_bps is not None:
        hi = min(hi, model.rate_bps / RATE_RANGE_BPS[0])
        if route.cls in SCALED_NETWORKS:
            scaled = model.rate_bps
        else:
            lo = max(lo, model.rate_bps / cap_bps)
    return lo, hi, scaled


def plan_passes(topo: TopologyConfig, routes: list[Route], tdf: float, byte_scale: float, cap_bps: float,
                extra: bool) -> list[list[Probe]]:
    """Probes grouped by the network build that measures them: the run's dilation first; with
    ``extra``, routes outside the checked ranges there get further builds at a TDF (and byte
    scale) that brings them in range, as few builds as the ranges allow."""
    main = [expect(topo, r, tdf, byte_scale) for r in routes]
    passes = [[p for p in main if not extra or _in_range(p, cap_bps)]]
    rest = [(r, *_feasible_tdf(topo, r, cap_bps)) for r, p in zip(routes, main) if extra and not _in_range(p, cap_bps)]
    rest.sort(key=lambda x: x[2])
    groups: list[list[tuple[Route, float, float, float | None]]] = []
    for item in rest:
        if item[1] > item[2]:                      # no TDF fits: measure (unjudged) with the run's dilation
            passes[0].append(expect(topo, item[0], tdf, byte_scale))
        elif groups and max(g[1] for g in groups[-1]) <= item[2] and item[1] <= min(g[2] for g in groups[-1]):
            groups[-1].append(item)
        else:
            groups.append([item])
    for group in groups:
        lo, hi = max(g[1] for g in group), min(g[2] for g in group)
        t = math.sqrt(lo * hi) if math.isfinite(hi) else lo
        scaled = [g[3] for g in group if g[3] is not None]
        s = min(1.0, cap_bps * t / max(scaled)) if scaled else byte_scale
        passes.append([expect(topo, g[0], t, s) for g in group])
    return [p for p in passes if p]


# -- measurements -------------------------------------------------------------------------------

def _wait_listening(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Wait for iperf3 -s to print that it listens (it runs with --forceflush). Reads the raw
    pipe: a buffered reader could hold the line while select() waits for more."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    seen = b""
    while b"listening" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        seen += chunk
    if b"listening" not in seen:
        proc.kill()
        raise MeasureError(f"iperf3 server did not start: {seen.decode(errors='replace').strip() or 'no output'}")


def _endpoints(net: Any, src: str, dst: str, cls: str, rails: tuple[int, int] | None) -> tuple[str, list[str]]:
    """(destination address, client binding arguments) of a measurement: with rails, the
    destination's rail address and the source rail's address bound, so that the probe leaves
    by that rail (the fabric's policy routes) and arrives on the other."""
    if rails is None:
        return net.address(dst, cls), []
    return net.address(dst, cls, rails[1]), ["-B", net.address(src, cls, rails[0])]


def _iperf(net: Any, src: str, dst: str, cls: str, client_args: list[str], port: int,
           timeout_s: float, rails: tuple[int, int] | None = None) -> dict[str, Any]:
    addr, bind = _endpoints(net, src, dst, cls, rails)
    # with rails the server binds the rail's address too: its UDP replies must leave from it
    server = net.popen(dst, ["iperf3", "-s", "-1", "-p", str(port), "--forceflush", *(["-B", addr] if bind else [])],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_listening(server)
        client = net.popen(src, ["iperf3", "-c", addr, *bind, "-p", str(port), "-J", *client_args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=timeout_s)
        try:
            data = json.loads(out)
        except ValueError:
            raise MeasureError(f"iperf3 {src}->{dst}: no JSON output ({err.strip()[:200]})") from None
        if "error" in data:
            raise MeasureError(f"iperf3 {src}->{dst}: {data['error']}")
        return data
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)


def measure_tcp(net: Any, src: str, dst: str, cls: str, duration_s: float = 3.0, port: int = IPERF_PORT,
                rails: tuple[int, int] | None = None) -> float:
    """TCP goodput (bit/s, receiver side) from ``src`` to ``dst`` (rail to rail with ``rails``),
    after a 1 s omitted warm-up."""
    data = _iperf(net, src, dst, cls, ["-t", f"{duration_s:g}", "-O", "1"], port, duration_s + 20, rails)
    return float(data["end"]["sum_received"]["bits_per_second"])


def udp_probe_shape(rate_bps: float | None, pps: float = UDP_TARGET_PPS) -> tuple[float, int]:
    """(send rate bit/s, payload bytes) for a loss probe: about ``pps`` packets per second, at
    most half the path's rate (so no queueing loss adds to the configured loss)."""
    budget = 0.5 * rate_bps if rate_bps else 1400 * 8 * pps
    length = int(min(1400, max(64, budget / 8 / pps)))
    return min(budget, pps * length * 8.0), length


def loss_free_probe_packets(queue_packets: int) -> int:
    """Packets a probe of a path without configured loss sends in all: no more than its smallest
    queue holds (less the control connection's share). iperf3 paces UDP to an average since the
    start, so a sender that a busy host stalls then catches up in a burst; a burst above the
    link's rate queues, and past the queue's limit it is dropped (silently: UdpSndbufErrors), which
    is congestion the probe made, not loss of the path. With no more packets than the queue holds
    no burst can overflow it, whatever the host does (the receiver's 8 MB buffer and the delayer's
    10 000-packet queue hold them too)."""
    return max(LOSS_FREE_MIN_PACKETS, min(UDP_TARGET_PPS, queue_packets - CONTROL_HEADROOM_PACKETS))


def measure_udp_loss(net: Any, src: str, dst: str, cls: str, rate_bps: float | None, duration_s: float = 3.0,
                     port: int = IPERF_PORT, rails: tuple[int, int] | None = None,
                     packets: int | None = None) -> tuple[float, int]:
    """(loss fraction, packets sent) of a paced UDP stream from ``src`` to ``dst``: for
    ``duration_s``, or exactly ``packets`` spread over it."""
    rate, length = udp_probe_shape(rate_bps, packets / duration_s if packets else UDP_TARGET_PPS)
    # a 4 MB socket buffer (passed to the server too): a receiver that misses a time slice on a
    # busy host must not add socket-buffer drops to the link's configured loss
    count = ["-k", str(packets)] if packets else ["-t", f"{duration_s:g}"]
    data = _iperf(net, src, dst, cls, ["-u", "-b", f"{int(rate)}", "-l", str(length), "-w", "4M", *count],
                  port, duration_s + 20, rails)
    s = data["end"]["sum"]
    packets = int(s.get("packets", 0))
    if packets <= 0:
        raise MeasureError(f"iperf3 UDP {src}->{dst}: no packets counted")
    return int(s.get("lost_packets", 0)) / packets, packets


def measure_rtt(net: Any, src: str, dst: str, cls: str, count: int = 20, interval_s: float = 0.05,
                rails: tuple[int, int] | None = None) -> float:
    """Median round-trip time (s) by ping, without the first echo (it waits for ARP). The median:
    a time slice lost to other load on a 2-core host delays a few echoes by milliseconds, which
    would move a mean but says nothing about the configured delay.
    ``-U``: user-to-user time, because ping's default kernel receive timestamp is taken before
    the receiving host's ingress delay (the fallback's NFQUEUE delayer). ping runs at a low
    real-time priority, like the delayer, so that other load on the host does not add its time
    slices to the measurement."""
    addr, bind = _endpoints(net, src, dst, cls, rails)
    argv = ["chrt", "-f", "5", "ping", "-U", "-n", "-c", str(count + 1), "-i", f"{interval_s:g}", "-W", "2",
            *(["-I", bind[1]] if bind else []), addr]
    proc = net.popen(src, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=count * interval_s + 30)
    rtts = {int(m.group(1)): float(m.group(2)) / 1e3 for m in _ECHO_RE.finditer(out)}
    rtts.pop(1, None)
    if not rtts:
        raise MeasureError(f"ping {src}->{dst}: no round trip measured ({out.strip()[-200:]})")
    return statistics.median(rtts.values())


# -- judging ------------------------------------------------------------------------------------

def _verdict(measured: dict[str, Any], key: str, outside: str | None,
             within: Callable[[float], bool]) -> str:
    """PASS/FAIL of one metric, or ``n/a (...)`` when the configuration is outside the calibrated
    range (``outside`` names why) or the metric was not measured."""
    if outside:
        return f"n/a ({outside})"
    if key not in measured:
        return "n/a (not measured)"
    if measured[key] is None:
        return "FAIL"
    return "PASS" if within(measured[key]) else "FAIL"


def judge(probe: Probe) -> None:
    """Fill ``probe.verdicts``: PASS / FAIL, or ``n/a (...)`` outside the calibrated ranges or
    when the metric was not measured."""
    m = probe.measured
    lo, hi = RATE_RANGE_BPS
    outside = ("unshaped" if probe.rate_bps is None else "lossy path" if probe.loss > 0
               else None if lo <= probe.rate_bps <= hi else "rate outside 10 Mbit/s..1 Gbit/s")
    probe.verdicts["goodput"] = _verdict(m, "goodput_bps", outside,
                                         lambda v: v >= GOODPUT_MIN_RATIO * probe.rate_bps)
    lo, hi = RTT_RANGE_S
    probe.verdicts["rtt"] = _verdict(m, "rtt_s", None if lo <= probe.rtt_s <= hi else "RTT outside 1..50 ms",
                                     lambda v: abs(v - probe.rtt_s) <= RTT_REL_TOL * probe.rtt_s + RTT_ABS_TOL_S)
    lo, hi = LOSS_RANGE
    probe.verdicts["loss"] = _verdict(m, "loss", None if lo <= probe.loss <= hi else "loss outside 0.5..5 %",
                                      lambda v: abs(v - probe.loss) <= LOSS_REL_TOL * probe.loss)


_VERDICT_OF = {"rtt_s": "rtt", "goodput_bps": "goodput", "loss": "loss"}


def _probe_rails(net: Any, probe: Probe) -> tuple[int, int] | None:
    """The probe's (source rail, destination rail) where either host has rails, else None."""
    plan = getattr(net, "plan", None)
    if plan is None or not any(len(plan.rails(h, probe.cls)) > 1 for h in (probe.src, probe.dst)):
        return None
    return probe.src_rail, probe.dst_rail


def measure_probe(net: Any, probe: Probe, duration_s: float = 3.0) -> None:
    """Run the three measurements of one probe and judge them. A measurement that fails (no
    echo, no iperf3 result: the path is broken) is recorded as None with its error, and fails.
    A measurement outside its tolerance is taken once more and the second one counts
    (``measured["retried"]`` names it): a burst of host noise passes, a wrong link fails twice."""
    measure_probes(net, [probe], duration_s)


def measure_probes(net: Any, probes: list[Probe], duration_s: float = 3.0) -> None:
    """:func:`measure_probe` for several probes at once (the rails of one host pair): each
    measurement (round trips, then TCP goodput, then UDP loss) runs on all of them together, on
    their own iperf3 ports, so a host's rails are checked in the time of one. The caller keeps
    their summed rate within the host's capacity (:func:`rail_batches`)."""
    errors: dict[int, list[str]] = {i: [] for i in range(len(probes))}

    def attempt(i: int, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (MeasureError, subprocess.TimeoutExpired) as exc:
            errors[i].append(str(exc))
            return None

    def measure(i: int, key: str) -> None:
        probe, port, rails = probes[i], IPERF_PORT + i, _probe_rails(net, probes[i])
        if key == "rtt_s":
            probe.measured["rtt_s"] = attempt(i, measure_rtt, net, probe.src, probe.dst, probe.cls, 20, 0.05, rails)
        elif key == "goodput_bps":
            probe.measured["goodput_bps"] = attempt(i, measure_tcp, net, probe.src, probe.dst, probe.cls, duration_s,
                                                    port, rails)
        else:
            # a loss-free path only shows it loses nothing: ~1 s, no more packets than its queue holds
            lossy = probe.loss > 0
            udp = attempt(i, measure_udp_loss, net, probe.src, probe.dst, probe.cls, probe.rate_bps,
                          duration_s if lossy else 1.0, port, rails,
                          None if lossy else loss_free_probe_packets(probe.queue_packets))
            probe.measured["loss"], probe.measured["udp_packets"] = udp if udp is not None else (None, 0)

    def keys(probe: Probe) -> list[str]:
        return ["rtt_s"] + (["goodput_bps"] if probe.rate_bps is not None else []) + ["loss"]

    def together(jobs: list[tuple[int, str]]) -> None:
        if len(jobs) == 1:
            measure(*jobs[0])
            return
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            list(pool.map(lambda job: measure(*job), jobs))

    for key in ("rtt_s", "goodput_bps", "loss"):
        together([(i, key) for i, p in enumerate(probes) if key in keys(p)])
    for p in probes:
        judge(p)
    retry = {i: [k for k in keys(p) if p.verdicts[_VERDICT_OF[k]] == "FAIL" and p.measured[k] is not None]
             for i, p in enumerate(probes)}
    for key in ("rtt_s", "goodput_bps", "loss"):
        jobs = [(i, key) for i, ks in retry.items() if key in ks]
        if jobs:
            together(jobs)
    for i, p in enumerate(probes):
        if retry[i]:
            p.measured["retried"] = retry[i]
            judge(p)
        if errors[i]:
            p.measured["errors"] = errors[i]


def rail_batches(probes: list[Probe], cap_bps: float, most: int = 16) -> list[list[Probe]]:
    """Probes grouped for :func:`measure_probes`: consecutive probes between the same two hosts
    over rails that share no link, at most ``most`` and at most ``cap_bps`` of summed rate per
    group (what the dilation keeps one host within); every other probe alone."""
    def railed(p: Probe) -> bool:
        return any(re.search(r"-r\d+$", name) for name in p.links[:1] + p.links[-1:])

    batches: list[list[Probe]] = []
    for p in probes:
        last = batches[-1] if batches else None
        if (last and railed(p) and railed(last[0]) and len(last) < most
                and (last[0].src, last[0].dst, last[0].cls) == (p.src, p.dst, p.cls)
                and not set(p.links).intersection(*[q.links for q in last])
                and p.rate_bps is not None and all(q.rate_bps is not None for q in last)
                and sum(q.rate_bps for q in last) + p.rate_bps <= cap_bps * 1.0001):  # type: ignore[misc]
            last.append(p)
        else:
            batches.append([p])
    return batches


def _rail_tag(p: Probe, rail: int, end: int) -> str:
    """``.r<k>`` when the probe's end link is a rail (its name ends in ``-r<k>``)."""
    return f".r{rail}" if p.links and re.search(r"-r\d+$", p.links[end]) else ""


def _fmt_rate(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:.1f}M"


def format_table(probes: list[Probe]) -> str:
    """Configured vs measured, with the error, one line per probe."""
    head = (f"{'path':<28} {'net':<8} {'tdf':>6} {'rate':>8} {'goodput':>8} {'err':>6} {'':<5}  {'rtt ms':>7} "
            f"{'meas':>7} {'err':>6} {'':<5}  {'loss %':>6} {'meas':>6} {'err':>6} {'':<5}")
    lines = [head, "-" * len(head)]

    def err(meas: float | None, conf: float | None) -> str:
        if meas is None or not conf:
            return "-"
        return f"{(meas - conf) / conf * 100:+.0f}%"

    def short(v: str) -> str:
        return v if v in ("PASS", "FAIL") else "n/a"

    def num(v: float | None, scale: float) -> str:
        return "-" if v is None else f"{v * scale:.2f}"

    for p in probes:
        m = p.measured
        path = f"{p.src}{_rail_tag(p, p.src_rail, 0)}->{p.dst}{_rail_tag(p, p.dst_rail, -1)}"
        lines.append(
            f"{path:<28.28} {p.cls:<8} {p.tdf:>6.4g} {_fmt_rate(p.rate_bps):>8} "
            f"{_fmt_rate(m.get('goodput_bps')):>8} {err(m.get('goodput_bps'), p.rate_bps):>6} "
            f"{short(p.verdicts.get('goodput', '')):<5}  {p.rtt_s * 1e3:>7.2f} {num(m.get('rtt_s'), 1e3):>7} "
            f"{err(m.get('rtt_s'), p.rtt_s):>6} {short(p.verdicts.get('rtt', '')):<5}  {p.loss * 100:>6.2f} "
            f"{num(m.get('loss'), 100):>6} {err(m.get('loss'), p.loss):>6} {short(p.verdicts.get('loss', '')):<5}")
        lines += [f"    {p.src}->{p.dst}: {e}" for e in m.get("errors", [])]
        if m.get("retried"):
            lines.append(f"    {p.src}->{p.dst}: measured again after a first value outside tolerance: "
                         f"{', '.join(m['retried'])}")
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------

def check_topology(topology: TopologyConfig, tdf: float | str = "auto", byte_scale: float | str = "auto",
                   prefix: str = "pt", impairment: str = "auto", duration_s: float = 2.0,
                   net_factory: Any = None, bound: Any = None) -> dict[str, Any]:
    """Build ``topology`` (once per pass), measure every probe, tear down; the report as a dict.
    With ``auto``, the host capacity is measured afresh (and cached for runs): the check judges
    rates this host carries now, and past its capacity the delayers drop packets and TCP
    collapses to a fraction of the rate, which says nothing about the shaping.
    ``net_factory(topology, **FabricNet kwargs)`` builds the net (default FabricNet; the
    mininet-cluster backend passes one spreading hosts over servers), and ``bound()`` returns a
    capacity below the host's that bounds the links, with why (its tunnels, measured afresh)."""
    from fabric.dilation import choose_emulation, measure_host_capacity, rate_cap_bps
    from fabric.net import FabricNet

    started = time.monotonic()
    auto = "auto" in (tdf, byte_scale)
    capacity = measure_host_capacity(prefix, impairment=impairment, use_cache=False) if auto else None
    limit = bound() if bound is not None else None
    if limit is not None and auto and (capacity is None or limit[0] < capacity):
        capacity = limit[0]
    factory = net_factory or FabricNet
    choice = choose_emulation(topology, tdf, byte_scale, host_capacity=capacity)
    passes = plan_passes(topology, plan_routes(topology), choice.tdf, choice.byte_scale, rate_cap_bps(capacity),
                         extra=auto)
    backend = None
    for probes in passes:
        net = factory(topology, tdf=probes[0].tdf, byte_scale=probes[0].byte_scale, prefix=prefix,
                      impairment=impairment)
        try:
            net.start()
            backend = net.impairment_backend
            for batch in rail_batches(probes, rate_cap_bps(capacity)):
                measure_probes(net, batch, duration_s)
        finally:
            net.stop()
    probes = [p for group in passes for p in group]
    return {"topology": topology.name, "tdf": choice.tdf, "byte_scale": choice.byte_scale,
            "reason": choice.reason + (f"; {limit[1]}" if limit is not None else ""),
            "host_capacity_bps": capacity, "impairment_backend": backend,
            "capacity_bound": {"bps": limit[0], "reason": limit[1]} if limit is not None else None,
            "passes": [{"tdf": g[0].tdf, "byte_scale": g[0].byte_scale, "probes": len(g)} for g in passes],
            "ok": all(p.ok for p in probes), "duration_s": time.monotonic() - started,
            "probes": [asdict(p) | {"ok": p.ok} for p in probes]}


def _auto_or_float(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def register_check(fabric_subparsers: argparse._SubParsersAction) -> None:
    """Add ``check TOPOLOGY [--json] [--tdf X] [--byte-scale Y]`` to ``pdtb fabric``."""
    p = fabric_subparsers.add_parser("check", help="build a topology and measure its links against their configuration")
    p.add_argument("topology", metavar="TOPOLOGY", help="a shipped topology name or a topology file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tdf", type=_auto_or_float, default="auto", help="time dilation factor (default auto)")
    p.add_argument("--byte-scale", type=_auto_or_float, default="auto", help="byte scale (default auto)")
    p.add_argument("--prefix", default="pt", help="name prefix of the namespaces and interfaces (default pt)")
    p.add_argument("--impairment", default="auto", choices=("auto", "netem", "fallback"))
    p.add_argument("--duration", type=float, default=2.0, help="seconds per iperf3 run (default 2)")
    p.add_argument("--cluster", metavar="SCENARIO", default=None,
                   help="check on the servers of SCENARIO's emulation.cluster (mininet-cluster backend): its "
                        "tunnels are measured afresh and bound the chosen rates (docs/cluster.md)")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    if os.geteuid() != 0:
        print("error: pdtb fabric check needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    try:
        hooks: dict[str, Any] = {}
        if getattr(args, "cluster", None):
            from testbed.runner.cluster import check_hooks  # the CLI glue reaches up; fabric/ itself does not

            hooks["net_factory"], hooks["bound"] = check_hooks(args.cluster, args.prefix)
        report = check_topology(topology, args.tdf, args.byte_scale, args.prefix, args.impairment, args.duration,
                                **hooks)
    except (ValueError, MeasureError, RuntimeError) as exc:
        print(f"error: fabric check of {args.topology}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        probes = [Probe(**{k: v for k, v in p.items() if k != "ok"}) for p in report["probes"]]
        print(f"topology {report['topology']}: tdf {report['tdf']:.4g}, byte scale {report['byte_scale']:.4g}, "
              f"impairment backend {report['impairment_backend']}")
        print(f"  ({report['reason']})")
        if report.get("capacity_bound"):
            print(f"  cross-server tunnels: {_fmt_rate(report['capacity_bound']['bps'])}bit/s (measured now)")
        if len(report["passes"]) > 1:
            print(f"  {len(report['passes']) - 1} more build(s) for paths outside the checked ranges at that "
                  f"dilation: " + ", ".join(f"tdf {p['tdf']:.4g} / byte scale {p['byte_scale']:.4g}"
                                           for p in report["passes"][1:]))
        print(format_table(probes))
        failed = [f"{p.src}->{p.dst} {k}" for p in probes for k, v in p.verdicts.items() if v == "FAIL"]
        print(f"{'OK' if report['ok'] else 'FAIL'}: {len(probes)} paths in {report['duration_s']:.0f} s"
              + (f"; outside tolerance: {', '.join(failed)}" if failed else ""))
        if any(p.verdicts.get("goodput") == "FAIL" for p in probes) and report["host_capacity_bps"]:
            print(f"  the rates were chosen for a host capacity of {_fmt_rate(report['host_capacity_bps'])}bit/s "
                  f"measured at the start: a host that got busier since carries less (run the check again "
                  f"when it is quieter, or pass a larger --tdf)")
    return 0 if report["ok"] else 1
