"""FabricNet on this machine's kernel: build and teardown leave nothing behind, shaped links
match their rate and loss (fallback backend here: HTB + iptables statistic + NFQUEUE delayer),
runtime changes take effect, captures work.

Runs with the prefix ``$PDTB_TEST_PREFIX`` (default ``pa``) and private subnets, so it does not
collide with a testbed run (prefix ``pt``, default subnets) on the same machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def leftovers() -> dict:
    from fabric.cleanup import PidRegistry, our_links, our_netns
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    return {"links": our_links(PREFIX), "netns": our_netns(PREFIX),
            "pids": [e["pid"] for e in PidRegistry(PREFIX).alive()],
            "rules": [line for line in rules.splitlines() if f"pdtb:{PREFIX}" in line]}


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


def iperf(net, src: str, dst: str, seconds: float = 3.0, udp_bps: float | None = None) -> dict:
    server = net.popen(dst, ["iperf3", "-s", "-1", "-B", net.address(dst, "efa")])
    time.sleep(0.4)
    argv = ["iperf3", "-c", net.address(dst, "efa"), "-t", str(seconds), "-J"]
    if udp_bps:
        argv += ["-u", "-b", str(int(udp_bps)), "-l", "1200"]
    client = net.popen(src, argv, stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=seconds + 30)
    server.wait(timeout=10)
    return json.loads(out)


def echo(net, src: str, dst: str, count: int = 10, timeout_s: float = 1.0) -> dict:
    server = net.popen(dst, [sys.executable, "-c", ECHO_SERVER, net.address(dst, "efa")])
    time.sleep(0.3)
    client = net.popen(src, [sys.executable, "-c", ECHO_CLIENT, net.address(dst, "efa"), str(count), str(timeout_s)],
                       stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=count * (timeout_s + 0.1) + 10)
    server.send_signal(signal.SIGKILL)
    server.wait()
    return json.loads(out)


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def test_pair_builds_and_tears_down_without_leftovers() -> None:
    net = make_net("pair", tdf=50, byte_scale=1 / 64)
    try:
        net.start()
        assert net.impairment_backend in ("netem", "fallback")
        settings = json.loads(json.dumps(net.settings()))          # recorded with every run
        assert settings["links"]["decode0-efa"]["emulated"]["rate_bps"] == pytest.approx(1.2e12 / 64 / 50)
        assert settings["impairment_backend"] == net.impairment_backend
        assert set(net.link_names()) == {"prefill0-efa", "decode0-efa", "prefill0-fe", "decode0-fe", "router-fe",
                                          "client0-fe"}
        assert net.address("decode0", "efa") == "10.232.0.12"
        with pytest.raises(KeyError):
            net.address("client0", "efa")
        # the root namespace reaches the router on the frontend, not the EFA network
        ok = subprocess.run(["ping", "-c", "1", "-W", "2", net.address("router", "frontend")], capture_output=True)
        assert ok.returncode == 0
        routes = net.host_node("prefill0").cmd("ip route show", SUBNETS["efa"])
        assert "rto_min" in routes and "quickack 1" in routes
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
        udp = iperf(net, "p0", "d0", seconds=2, udp_bps=20e6)["end"]["sum"]
        assert udp["packets"] > 2000
        assert 6.0 <= udp["lost_percent"] <= 14.0, udp
        net.set_link("p0-efa", loss=0.0)
        net.set_link("d0-efa", loss=0.0)
        # latency: 2 ms model one-way per link x TDF 10 -> 80 ms wall round trip
        base = median(echo(net, "p0", "d0")["rtts"])
        assert base < 0.02, base
        net.set_link("p0-efa", latency_s=2e-3)
        net.set_link("d0-efa", latency_s=2e-3)
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
    net = make_net(duo, tdf=TDF)
    try:
        net.start()
        paths = net.start_capture(["efa"], tmp_path / "pcap")
        assert sorted(p.name for p in paths) == ["d0-efa.pcap", "p0-efa.pcap"]
        with pytest.raises(ValueError):
            net.start_capture(["bogus"], tmp_path)
        echo(net, "p0", "d0", count=3)
        net.stop_capture()
    finally:
        net.stop()
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 24 + 3 * 16, path
        assert int.from_bytes(data[16:20], "little") == 256          # snaplen in the pcap header


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
    assert nothing_left(), leftovers()
