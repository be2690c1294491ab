"""The userspace delayer (fallback delay/jitter backend) between two namespaces of prefix ``pb``."""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import time

import pytest

from fabric.shaping.nfqdelay import Delayer, DelayerError

ADDR = {"pbt1": "10.250.77.1", "pbt2": "10.250.77.2"}
_ECHO = re.compile(r"icmp_seq=(\d+) .*?time=([\d.]+) ms")


def _rtts(host, dst: str, count: int = 20, interval_s: float = 0.05) -> list[float]:
    """Per-echo RTTs (s), user-to-user (-U), without the first echo (ARP). ping runs at a
    real-time priority so that busy neighbours do not add their time slices to the measurement."""
    out = host.cmd(f"chrt -f 5 ping -U -n -c {count + 1} -i {interval_s} -W 2 {dst}")
    rtts = {int(m.group(1)): float(m.group(2)) / 1e3 for m in _ECHO.finditer(out)}
    rtts.pop(1, None)
    return list(rtts.values())


def _within(measured: float, configured: float) -> bool:
    """A loose bound on a median RTT: the delay is applied once per direction (not zero, not
    twice). The fabric check's ±10 % + 0.3 ms is judged by `pdtb fabric check` (test_fabric_check)
    and benchmarks/fabric_fidelity.py; on this shared 2-core VM, minutes-long bursts of host noise
    were seen to add 1-2 ms to the median of a 5 ms round trip, so a test cannot hold it to that."""
    return configured - 0.3e-3 <= measured <= 1.5 * configured + 1e-3


pytestmark = pytest.mark.root


@pytest.fixture
def pair():
    from mininet.link import Link
    from mininet.node import Host

    h1, h2 = Host("pbt1"), Host("pbt2")
    link = Link(h1, h2, intfName1="pbt1-eth0", intfName2="pbt2-eth0")
    try:
        for h in (h1, h2):
            h.setIP(f"{ADDR[h.name]}/24", intf=f"{h.name}-eth0")
            # as the fabric's shaped interfaces: wire-sized packets, not 64 KB GSO super-packets
            h.cmd(f"ethtool -K {h.name}-eth0 gro off gso off tso off")
        yield h1, h2
    finally:
        link.delete()
        h1.terminate()
        h2.terminate()


@pytest.fixture
def delayers(pair):
    started: list[Delayer] = []

    def start(latency_s: float, jitter_s: float = 0.0) -> tuple[Delayer, Delayer]:
        h1, h2 = pair
        for h, q in ((h1, 7), (h2, 8)):
            started.append(Delayer.start(h, f"{h.name}-eth0", q, latency_s, jitter_s, comment=f"pdtb:pb:test:{h.name}"))
        return started[-2], started[-1]

    yield start
    for d in started:
        d.stop()


def _raw_rules(host) -> str:
    return host.cmd("iptables -w -t raw -S PREROUTING")


@pytest.mark.root
@pytest.mark.parametrize("rtt_s", [0.005, 0.020])
def test_round_trip_within_tolerance(pair, delayers, rtt_s):
    h1, _ = pair
    delayers(rtt_s / 2)          # each host's ingress holds half the round trip
    rtts = _rtts(h1, ADDR["pbt2"])
    assert len(rtts) >= 15
    median = statistics.median(rtts)
    assert _within(median, rtt_s), f"median RTT {median * 1e3:.3f} ms, configured {rtt_s * 1e3:.1f} ms"


@pytest.mark.root
def test_tcp_goodput_not_collapsed_at_10ms(pair, delayers):
    h1, h2 = pair
    delayers(0.010)
    server = h2.popen(["iperf3", "-s", "-1", "-p", "5399"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = h1.cmd(f"iperf3 -c {ADDR['pbt2']} -p 5399 -t 2 -J")
        bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    finally:
        server.kill()
        server.wait()
    # held at the sender's egress, TCP small queues collapse this to a few Mbit/s
    assert bps > 150e6, f"TCP goodput {bps / 1e6:.1f} Mbit/s with 10 ms delay"


@pytest.mark.root
def test_update_takes_effect(pair, delayers):
    h1, _ = pair
    d1, d2 = delayers(0.0025)
    before = _rtts(h1, ADDR["pbt2"], 15)
    d1.update(0.010, 0.0)
    d2.update(0.010, 0.0)
    after = _rtts(h1, ADDR["pbt2"], 15)
    assert _within(statistics.median(before), 0.005), before
    assert _within(statistics.median(after), 0.020), after
    assert d1.stats()["latency_s"] == pytest.approx(0.010)
    # bad requests are refused and leave the delayer running with its settings
    assert d1._request({"cmd": "set", "latency_s": -1, "jitter_s": 0})["ok"] is False
    assert d1._request({"cmd": "nope"})["ok"] is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(d1.control_path))
        sock.sendall(b"[1, 2]\n")
        assert json.loads(sock.recv(4096))["ok"] is False
    with pytest.raises(ValueError):
        d1.update(0.01, float("nan"))
    assert d1.alive() and d1.stats()["latency_s"] == pytest.approx(0.010)


@pytest.mark.root
def test_jitter_spreads_delay_and_keeps_order(pair, delayers):
    h1, _ = pair
    d1, _ = delayers(0.005, 0.002)
    # Each RTT is 10 ms + two independent uniform +-2 ms jitters: sd = sqrt(2 x 4^2 / 12) = 1.63 ms.
    # The median of n = 200 has a standard error of 1.253 x 1.63 / sqrt(200) = 0.14 ms, so the
    # lower bound 0.75 ms under the configured 10 ms is > 5 standard errors away (30 echoes, as
    # before, gave 0.37 ms and a 0.3 ms bound failed by chance). The upper bound stays loose: host
    # noise only adds delay.
    rtts = _rtts(h1, ADDR["pbt2"], 200, interval_s=0.02)
    assert len(rtts) >= 190
    assert max(rtts) - min(rtts) > 1.5e-3                # the spread of 200 draws covers most of +-4 ms
    assert 0.010 - 0.75e-3 <= statistics.median(rtts) <= 1.5 * 0.010 + 1e-3
    # 40 echoes 2 ms apart, closer than the +-2 ms jitter: a delayer that released each packet at
    # its own jittered time would reorder many of them; FIFO release keeps every reply in order
    out = h1.cmd(f"ping -U -n -c 40 -i 0.002 -W 2 {ADDR['pbt2']}")
    seqs = [int(m.group(1)) for m in _ECHO.finditer(out)]
    assert len(seqs) == 40, out
    assert seqs == sorted(seqs), f"replies out of order: {seqs}"
    assert d1.stats()["released"] >= 40


@pytest.mark.root
def test_stop_leaves_nothing(pair):
    h1, _ = pair
    d = Delayer.start(h1, "pbt1-eth0", 9, 0.002, 0.0, comment="pdtb:pb:test:stop")
    assert "pdtb:pb:test:stop" in _raw_rules(h1)
    pid, workdir = d.pid, d.workdir
    d.stop()
    d.stop()                                             # idempotent
    assert "pdtb:pb:test:stop" not in _raw_rules(h1)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert not workdir.exists()


@pytest.mark.root
def test_dead_delayer_stops_traffic_loudly(pair, delayers):
    h1, _ = pair
    d1, d2 = delayers(0.001)
    d2.proc.kill()
    d2.proc.wait()
    assert not d2.alive()
    out = h1.cmd(f"ping -n -c 3 -i 0.2 -W 1 {ADDR['pbt2']}")
    assert "100% packet loss" in out                     # no --queue-bypass: no silent undelayed traffic
    with pytest.raises((DelayerError, OSError)):
        d2.stats()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="interface name"):
        Delayer.start(None, "eth0; rm -rf /", 1, 0.01, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latency_s"):
        Delayer.start(None, "eth0", 1, -1.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_num"):
        Delayer.start(None, "eth0", 70000, 0.01, 0.0)  # type: ignore[arg-type]
