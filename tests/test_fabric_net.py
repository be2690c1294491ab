"""FabricNet on this machine's kernel: build and teardown leave nothing behind, shaped links
match their rate and loss (fallback backend here: HTB + iptables statistic + NFQUEUE delayer),
runtime changes take effect, captures work.

Runs with the prefix ``$PDTB_TEST_PREFIX`` (default ``pa``) and private subnets, so it does not
collide with a testbed run (prefix ``pt``, default subnets) on the same machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.root

PREFIX = os.environ.get("PDTB_TEST_PREFIX", "pa")
SUBNETS = {"frontend": "10.231.0.0/16", "efa": "10.232.0.0/16", "mgmt": "10.233.0.0/16"}

DUO = {
    "kind": "topology",
    "name": "duo",
    "hosts": [{"name": "p0", "role": "prefill", "hardware": "trn2"},
              {"name": "d0", "role": "decode", "hardware": "cs3"}],
    "switches": [{"name": "efa", "network": "efa"}, {"name": "fe", "network": "frontend"}],
    "links": [
        {"name": "p0-efa", "a": "p0", "b": "efa", "class": "efa", "params": {"bandwidth": "8Gbps", "mtu": 9001}},
        {"name": "d0-efa", "a": "d0", "b": "efa", "class": "efa", "params": {"bandwidth": "2Gbps", "mtu": 9001}},
        {"name": "p0-fe", "a": "p0", "b": "fe", "class": "frontend"},
        {"name": "d0-fe", "a": "d0", "b": "fe", "class": "frontend"},
    ],
}
TDF = 10.0   # d0-efa: 2 Gbit/s model -> 200 Mbit/s emulated

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 9999))
while True:
    data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""
ECHO_CLIENT = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(float(sys.argv[3]))
rtts, lost = [], 0
for i in range(int(sys.argv[2])):
    t = time.monotonic(); s.sendto(str(i).encode(), (sys.argv[1], 9999))
    try:
        while s.recv(2048) != str(i).encode():
            pass
        rtts.append(time.monotonic() - t)
    except socket.timeout:
        lost += 1
    time.sleep(0.02)
print(json.dumps({"rtts": rtts, "lost": lost}))
"""


def delayer_dirs(prefix: str = PREFIX) -> list[Path]:
    """The NFQUEUE delayers' temp dirs (``pdtb-nfq-<interface>.<random>``) on the prefix's interfaces."""
    from fabric.cleanup import our_name
    return [p for p in Path(tempfile.gettempdir()).glob("pdtb-nfq-*")
            if our_name(p.name[len("pdtb-nfq-"):].rpartition(".")[0], prefix)]


def leftovers() -> dict:
    from fabric.cleanup import our_links, our_netns, prefix_registry
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    return {"links": our_links(PREFIX), "netns": our_netns(PREFIX),
            "pids": [e["pid"] for e in prefix_registry(PREFIX).alive()],
            "rules": [line for line in rules.splitlines() if f"pdtb:{PREFIX}" in line],
            "delayer_dirs": [str(p) for p in delayer_dirs()]}


def nothing_left() -> bool:
    return not any(leftovers().values())


@pytest.fixture
def duo(tmp_path: Path):
    path = tmp_path / "duo.yaml"
    path.write_text(yaml.safe_dump(DUO))
    return path


@pytest.fixture(autouse=True)
def clean_slate():
    from fabric.cleanup import clean
    clean(PREFIX)
    yield
    left = leftovers()
    clean(PREFIX)
    assert not any(left.values()), f"left behind: {left}"


def make_net(topo, **kw):
    from fabric.net import FabricNet
    return FabricNet(topo, prefix=PREFIX, subnets=SUBNETS, impairment="auto", **kw)


def iperf(net, src: str, dst: str, seconds: float = 3.0) -> dict:
    server = net.popen(dst, ["iperf3", "-s", "-1", "-B", net.address(dst, "efa")])
    time.sleep(0.4)
    argv = ["iperf3", "-c", net.address(dst, "efa"), "-t", str(seconds), "-J"]
    client = net.popen(src, argv, stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=seconds + 30)
    server.wait(timeout=10)
    return json.loads(out)


def udp_iperf(net, src: str, dst: str, rate_bps: float, seconds: float = 2.0, tries: int = 3) -> dict:
    """iperf3 UDP's end summary, retried when iperf3 itself fails to set up or report: its UDP
    handshake is one datagram each way, which the configured loss drops now and then."""
    errors = []
    for _ in range(tries):
        server = net.popen(dst, ["iperf3", "-s", "-1", "-B", net.address(dst, "efa")])
        time.sleep(0.4)
        client = net.popen(src, ["iperf3", "-c", net.address(dst, "efa"), "-t", str(seconds), "-J", "-u",
                                 "-b", str(int(rate_bps)), "-l", "1200"], stdout=subprocess.PIPE)
        try:
            out, _ = client.communicate(timeout=seconds + 10)
            data = json.loads(out)
            if "sum" in data.get("end", {}):
                return data["end"]["sum"]
            errors.append(data.get("error", "no summary"))
        except (subprocess.TimeoutExpired, ValueError) as exc:
            errors.append(type(exc).__name__)
            client.kill()
            client.wait()
        finally:
            server.kill()
            server.wait()
    pytest.fail(f"iperf3 UDP {src}->{dst} failed {tries} times: {errors}")


def echo(net, src: str, dst: str, count: int = 10, timeout_s: float = 1.0) -> dict:
    server = net.popen(dst, [sys.executable, "-c", ECHO_SERVER, net.address(dst, "efa")])
    time.sleep(0.3)
    client = net.popen(src, [sys.executable, "-c", ECHO_CLIENT, net.address(dst, "efa"), str(count), str(timeout_s)],
                       stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=count * (timeout_s + 0.1) + 10)
    server.send_signal(signal.SIGKILL)
    server.wait()
    return json.loads(out)


def pcap_udp_payloads(path: Path, port: int) -> list[bytes]:
    """Payloads (as captured) of the UDP datagrams to or from ``port`` in a classic pcap file."""
    data = path.read_bytes()
    off, out = 24, []
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        rec = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(rec) >= 42 and rec[12:14] == b"\x08\x00" and rec[23] == 17:
            udp = rec[14 + (rec[14] & 15) * 4:]
            if port in struct.unpack("!HH", udp[:4]):
                out.append(udp[8:])
    return out


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def test_pair_builds_and_tears_down_without_leftovers() -> None:
    net = make_net("pair", tdf=50, byte_scale=1 / 64)
    try:
        net.start()
        assert net.impairment_backend in ("netem", "fallback")
        settings = json.loads(json.dumps(net.settings()))          # recorded with every run
        # the CS-3's 12 rails of 100 Gbit/s, the trn2's 16 of 200 Gbit/s, each its own emulated link
        assert settings["links"]["decode0-efa-r0"]["emulated"]["rate_bps"] == pytest.approx(1.2e12 / 12 / 64 / 50)
        assert settings["links"]["prefill0-efa-r15"]["emulated"]["rate_bps"] == pytest.approx(3.2e12 / 16 / 64 / 50)
        assert settings["impairment_backend"] == net.impairment_backend
        assert set(net.link_names()) == ({f"prefill0-efa-r{k}" for k in range(16)} | {f"decode0-efa-r{k}" for k in range(12)}
                                         | {"prefill0-fe", "decode0-fe", "router-fe", "client0-fe"})
        assert net.address("decode0", "efa") == "10.232.0.12"
        assert net.addresses("decode0") == [f"10.232.{8 * k}.12" for k in range(12)]
        # a probe bound to a rail's address leaves by that rail and arrives on the peer's rail
        # (policy routes, and ARP answered only by the interface that has the address)
        d0 = net.host_node("decode0")

        def rx(k: int) -> int:
            return int(d0.cmd(f"cat /sys/class/net/{PREFIX}decode0-e{k:x}/statistics/rx_packets"))

        for src_rail, dst_rail in ((3, 3), (13, 1)):
            before = [rx(k) for k in range(12)]
            ping = net.host_node("prefill0").cmd(f"ping -c 20 -i 0.01 -W 2 -I {net.address('prefill0', 'efa', src_rail)} "
                                                 f"{net.address('decode0', 'efa', dst_rail)}")
            assert " 0% packet loss" in ping, ping
            grew = [rx(k) - b for k, b in enumerate(before)]
            # the echoes on the addressed rail; the others see at most the ARP request (a broadcast)
            assert grew[dst_rail] >= 20 and max(g for k, g in enumerate(grew) if k != dst_rail) <= 2, grew
        with pytest.raises(KeyError):
            net.address("client0", "efa")
        # the root namespace reaches the router on the frontend, not the EFA network
        ok = subprocess.run(["ping", "-c", "1", "-W", "2", net.address("router", "frontend")], capture_output=True)
        assert ok.returncode == 0
        routes = [r for r in net.host_node("prefill0").cmd("ip route show").splitlines() if r.startswith("10.232.")]
        assert len(routes) == 16 and all("rto_min" in r and "quickack 1" in r for r in routes), routes
        # a second net on the same subnets (another prefix) is refused: it would split the root's routes
        from fabric.net import FabricError, FabricNet
        with pytest.raises(FabricError, match="already has addresses in this run's subnets"):
            FabricNet("pair", prefix=PREFIX[0] + "z", subnets=SUBNETS)
        sleeper = net.popen("decode0", ["sleep", "600"])
        assert any(e["pid"] == sleeper.pid for e in net.registry.alive())
        assert not nothing_left()
    finally:
        net.stop()
    net.stop()   # idempotent
    assert sleeper.poll() is not None
    assert nothing_left(), leftovers()


def test_failed_start_cleans_up(duo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric.net import FabricError, FabricNet

    def fail(self) -> None:
        raise FabricError("injected failure after the namespaces and links exist")

    monkeypatch.setattr(FabricNet, "_set_rto_min", fail)
    net = make_net(duo, tdf=TDF)
    with pytest.raises(FabricError, match="injected"):
        net.start()
    assert nothing_left(), leftovers()


def test_shaped_rate_loss_and_runtime_changes(duo: Path) -> None:
    net = make_net(duo, tdf=TDF)
    try:
        net.start()
        # rate: 200 Mbit/s emulated at the switch port toward d0 (the narrower link)
        got = iperf(net, "p0", "d0")["end"]["sum_received"]["bits_per_second"]
        assert 0.75 * 200e6 <= got <= 1.05 * 200e6, got
        # runtime: bandwidth down to 1 Gbit/s model -> 100 Mbit/s emulated
        net.set_link("d0-efa", bandwidth_bps=1e9)
        got = iperf(net, "p0", "d0", seconds=2)["end"]["sum_received"]["bits_per_second"]
        assert 0.75 * 100e6 <= got <= 1.05 * 100e6, got
        # loss on both links of the path composes: 1 - 0.95 * 0.95 = 9.75 %
        net.set_link("p0-efa", loss=0.05)
        net.set_link("d0-efa", loss=0.05)
        udp = udp_iperf(net, "p0", "d0", 20e6)
        assert udp["packets"] > 2000
        assert 6.0 <= udp["lost_percent"] <= 14.0, udp
        net.set_link("p0-efa", loss=0.0)
        net.set_link("d0-efa", loss=0.0)
        # latency: 2 ms model one-way per link x TDF 10 -> 80 ms wall round trip
        base = median(echo(net, "p0", "d0")["rtts"])
        assert base < 0.02, base
        assert net.delayers() == {}                     # no latency anywhere yet: no delayer
        net.set_link("p0-efa", latency_s=2e-3)
        net.set_link("d0-efa", latency_s=2e-3)
        if net.impairment_backend == "fallback":        # each ingress holds twice its link's 20 ms
            delayers = net.delayers()
            assert set(delayers) == {f"{PREFIX}p0-e", f"{PREFIX}d0-e"}
            assert all(d.latency_s == pytest.approx(0.04) for d in delayers.values())
        else:
            assert net.delayers() == {}
        rtt = median(echo(net, "p0", "d0")["rtts"])
        assert 0.075 <= rtt <= 0.11, rtt
        # link down: nothing passes; up: traffic resumes with the same settings
        net.set_link("d0-efa", up=False)
        assert echo(net, "p0", "d0", count=3, timeout_s=0.3)["lost"] == 3
        net.set_link("d0-efa", up=True)
        back = echo(net, "p0", "d0", count=5)
        assert back["lost"] <= 1 and 0.075 <= median(back["rtts"]) <= 0.11, back
        assert net.settings()["links"]["d0-efa"]["emulated"]["latency_s"] == pytest.approx(0.02)
        with pytest.raises(KeyError):
            net.set_link("nope", loss=0.1)
    finally:
        net.stop()


def test_capture_writes_pcaps_with_snaplen(duo: Path, tmp_path: Path) -> None:
    from fabric.capture import DRAIN_MAX_S, SNAPLEN
    net = make_net(duo, tdf=TDF)
    try:
        net.start()
        paths = net.start_capture(["efa"], tmp_path / "pcap")
        assert sorted(p.name for p in paths) == ["d0-efa.pcap", "p0-efa.pcap"]
        with pytest.raises(ValueError):
            net.start_capture(["bogus"], tmp_path)
        got = echo(net, "p0", "d0", count=5)
        t = time.monotonic()
        net.stop_capture()          # right after the last echo: nothing tcpdump received may be lost
        stopped_in = time.monotonic() - t
    finally:
        net.stop()
    assert got["lost"] == 0, got
    assert stopped_in < DRAIN_MAX_S + 2.0, stopped_in
    for path in paths:
        data = path.read_bytes()
        assert int.from_bytes(data[16:20], "little") == SNAPLEN == 256    # snaplen in the pcap header
        payloads = pcap_udp_payloads(path, 9999)                          # 5 echoes, both directions
        assert sorted(payloads) == sorted([str(i).encode() for i in range(5)] * 2), (path, payloads)


def test_snaplen_keeps_a_whole_begin_header_and_request_id() -> None:
    """BEGIN starts a segment; behind the largest Ethernet/IP/TCP headers its frame header, fixed
    fields and the longest request id still fit the capture's snap length."""
    from fabric.capture import HEADERS_MAX, KV_BEGIN_HEAD_MAX, SNAPLEN
    from nodes.kvproto import KvBegin, encode_begin
    rid = "r" * 64                                                        # the longest request id
    raw = encode_begin(KvBegin(request_id=rid, model="m", layers=80, tokens=4096, total_bytes=1 << 30))
    end_of_rid = raw.index(rid.encode()) + len(rid)
    assert end_of_rid == KV_BEGIN_HEAD_MAX
    assert HEADERS_MAX == 14 + 60 + 60 and HEADERS_MAX + end_of_rid <= SNAPLEN


def test_capture_stop_waits_until_the_file_stops_growing(tmp_path: Path) -> None:
    from fabric.capture import Capture, wait_settled
    path = tmp_path / "growing.pcap"

    def writer(count: int) -> subprocess.Popen:
        """Appends a byte every 0.05 s, ``count`` times (0: forever); returns once it has begun."""
        path.write_bytes(b"")
        proc = subprocess.Popen([sys.executable, "-c", "import itertools, sys, time\n"
                                 "for _ in (range(int(sys.argv[2])) if int(sys.argv[2]) else itertools.count()):\n"
                                 "    open(sys.argv[1], 'ab').write(b'x'); time.sleep(0.05)", str(path), str(count)])
        while path.stat().st_size == 0 and proc.poll() is None:
            time.sleep(0.01)
        return proc

    proc = writer(16)
    try:
        waited = wait_settled([Capture(None, "x", path, proc)], settle_s=0.4, max_s=10.0)
        assert path.stat().st_size == 16, "stopped before the writes ended"
        assert 0.4 <= waited <= 6.0, waited
    finally:
        proc.kill()
        proc.wait()
    proc = writer(0)
    try:
        waited = wait_settled([Capture(None, "x", path, proc)], settle_s=0.4, max_s=1.0)
        assert 1.0 <= waited <= 2.5, waited                               # bounded
    finally:
        proc.kill()
        proc.wait()


def test_net_without_root_access_builds_and_tears_down(duo: Path) -> None:
    """No root-namespace attachment: Mininet then sets up the bridge class first, which must not
    look for brctl (bridge-utils is not installed). A fresh interpreter, as Mininet's per-class
    setup state is per process."""
    script = f"""
import json
from fabric.cleanup import our_links
from fabric.net import FabricNet
net = FabricNet({str(duo)!r}, tdf={TDF}, prefix={PREFIX!r}, subnets={SUBNETS!r}, root_access=False)
try:
    net.start()
    try:
        net.root_address("frontend")
        root = "attached"
    except KeyError:
        root = "detached"
    ping = net.host_node("p0").cmd("ping -c 1 -W 2", net.address("d0", "efa"))
    print(json.dumps({{"root": root, "root_links": [n for n in our_links({PREFIX!r}) if "root" in n],
                      "ping": " 0% packet loss" in ping}}))
finally:
    net.stop()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "brctl" not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"root": "detached", "root_links": [], "ping": True}
    assert nothing_left(), leftovers()


def test_clean_removes_dead_delayers_dirs_of_its_prefix_only() -> None:
    from fabric.cleanup import clean
    other = "zz" if PREFIX != "zz" else "zy"
    tmp = Path(tempfile.gettempdir())
    dead = Path(tempfile.mkdtemp(prefix=f"pdtb-nfq-{PREFIX}x0-e.", dir=tmp))
    (dead / "delayer.log").write_text("crashed\n")
    live = Path(tempfile.mkdtemp(prefix=f"pdtb-nfq-{PREFIX}x1-e.", dir=tmp))
    foreign = Path(tempfile.mkdtemp(prefix=f"pdtb-nfq-{other}x0-e.", dir=tmp))
    # a running process naming the dir's control socket, as a delayer does
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--control",
                               str(live / "ctl.sock")])
    try:
        report = clean(PREFIX)
        assert str(dead) in report.workdirs and not dead.exists()
        assert live.exists() and foreign.exists()
        assert any("delayer directories" in line and str(dead) in line for line in report.lines())
        holder.kill()
        holder.wait()
        assert clean(PREFIX).workdirs == [str(live)] and not live.exists()
        assert foreign.exists()
    finally:
        holder.kill()
        holder.wait()
        for path in (dead, live, foreign):
            shutil.rmtree(path, ignore_errors=True)


def test_clean_removes_a_crashed_runs_leftovers() -> None:
    from fabric.cleanup import clean
    script = f"""
import sys, time
from fabric.net import FabricNet
net = FabricNet("pair", tdf=50, byte_scale=1 / 64, prefix={PREFIX!r}, subnets={SUBNETS!r})
net.start()
net.popen("decode0", ["sleep", "600"])
print("ready", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()        # a crash: no teardown at all
        proc.wait()
    left = leftovers()
    assert left["links"] and left["pids"], left
    report = clean(PREFIX)
    assert set(left["pids"]) <= set(report.killed)
    assert sorted(report.workdirs) == sorted(left["delayer_dirs"])     # the killed delayers' temp dirs
    assert nothing_left(), leftovers()
