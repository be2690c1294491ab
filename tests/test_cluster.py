"""The mininet-cluster backend: its config, placement and command construction (no root), and
one emulated fabric over two "servers" on this machine (root): localhost, and an sshd this test
starts on 127.0.0.2 with its own host key and authorized key in a temp dir, stopped by its PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import run_pdtb, wait_for

from core.config import ConfigError
from testbed.config.scenario import ClusterSpec, EmulationSpec, scenario_from_data, topology_problems

PREFIX = "pk"  # this file's own Mininet prefix
SUBNETS = {"frontend": "10.241.0.0/16", "efa": "10.242.0.0/16", "mgmt": "10.243.0.0/16"}
REMOTE = "127.0.0.2"


def spec(**kw) -> ClusterSpec:
    return ClusterSpec.model_validate({"servers": ["localhost", REMOTE], **kw})


# ------------------------------------------------------------------ config (no root)
@pytest.mark.parametrize("servers,why", [
    (["127.0.0.2"], "servers[0] must be 'localhost'"),
    (["localhost", "a b"], "neither an IP address nor a hostname"),
    (["localhost", "host;rm -rf /"], "neither an IP address nor a hostname"),
    (["localhost", "-oProxyCommand=x"], "neither an IP address nor a hostname"),
    (["localhost", "node1", "node1"], "distinct"),
    ([], "at least 1"),
])
def test_bad_servers_are_refused(servers, why):
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        ClusterSpec.model_validate({"servers": servers})


def test_good_servers_pass():
    s = ClusterSpec.model_validate({"servers": ["localhost", "node-2.lab.example", "10.0.0.12", "fe80::1"]})
    assert s.servers[1] == "node-2.lab.example" and s.tunnel == "ssh" and s.tunnel_capacity == "auto"


def test_placement_must_name_a_listed_server():
    with pytest.raises(ValueError, match="not one of servers"):
        spec(placement={"d0": "127.0.0.3"})


def test_backend_needs_cluster_section():
    with pytest.raises(ValueError, match="needs emulation.cluster.servers"):
        EmulationSpec.model_validate({"backend": "mininet-cluster"})
    em = EmulationSpec.model_validate({"backend": "mininet-cluster", "cluster": {"servers": ["localhost"]}})
    assert em.cluster is not None


def test_identity_file_must_be_absolute():
    with pytest.raises(ValueError, match="absolute path"):
        spec(identity_file="id_ed25519")


def test_placement_of_unknown_host_is_a_config_problem(repo):
    from fabric.topology import load_topology

    sc = scenario_from_data({"name": "t", "topology": "pair", "model": "llama-3.1-8b",
                             "emulation": {"backend": "mininet-cluster",
                                           "cluster": {"servers": ["localhost", REMOTE],
                                                       "placement": {"nosuch": REMOTE}}},
                             "workload": {"requests": 1, "arrival": {"rate": 1}, "output_tokens": 4,
                                          "prompt_tokens": {"dist": "fixed", "value": 16}}},
                            "t.yaml", repo / "scenarios")
    problems = topology_problems(sc, load_topology("pair"))
    assert any(key == "emulation.cluster.placement.nosuch" for key, _ in problems), problems


def test_placement_bins_and_overrides():
    from testbed.runner.cluster import place_hosts

    hosts = ["p0", "p1", "p2", "d0", "d1"]
    placed = place_hosts(ClusterSpec.model_validate({"servers": ["localhost", "a", "b"]}), hosts)
    # five hosts over three servers, contiguous bins of 2, 2, 1 (Mininet's SwitchBinPlacer.bin)
    assert placed == {"p0": "localhost", "p1": "localhost", "p2": "a", "d0": "a", "d1": "b"}
    placed = place_hosts(ClusterSpec.model_validate({"servers": ["localhost", "a"], "placement": {"d1": "localhost"}}),
                         hosts)
    assert placed["d1"] == "localhost" and sorted(placed) == sorted(hosts)
    assert list(placed.values()).count("a") == 2  # the four unplaced hosts binned 2 + 2


def test_ssh_commands_quote_every_word():
    from testbed.runner.cluster import remote_record_argv, ssh_argv, tunnel_argv

    s = spec(identity_file="/tmp/k/id", known_hosts_file="/tmp/k/known", ssh_port=2222)
    argv = ssh_argv(s, REMOTE, ["echo", "a b", "$(x)"])
    assert argv[:1] == ["ssh"] and "-p" in argv and argv[argv.index("-p") + 1] == "2222"
    assert argv[-2] == f"root@{REMOTE}" and argv[-1] == "echo 'a b' '$(x)'"
    assert "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=/tmp/k/known" in argv
    tun = tunnel_argv(s, REMOTE, 4000, 4001)
    assert tun[tun.index("-w") + 1] == "4000:4001" and "Tunnel=ethernet" in tun
    wrapped = remote_record_argv(PREFIX, ["python3", "-m", "nodes"], "pkd0: python3")
    assert wrapped[:2] == ["sh", "-c"] and wrapped[-3:] == ["python3", "-m", "nodes"]
    assert f"/run/pdtb/{PREFIX}/remote-pids" in wrapped[2] and 'exec "$@"' in wrapped[2]
    with pytest.raises(ValueError):
        remote_record_argv("bad prefix!", ["x"], "x")
    with pytest.raises(ValueError):
        remote_record_argv(PREFIX, ["x"], "x", token="; rm -rf /")
    from testbed.runner.cluster import remote_signal_argv

    kill = remote_signal_argv(PREFIX, "0123456789ab", 15)
    assert kill[:2] == ["sh", "-c"] and "-v t=0123456789ab" in kill[2] and 'kill -15 "$1"' in kill[2]


@pytest.mark.root
def test_pdtb_clean_stops_what_a_killed_cluster_run_recorded_on_this_machine(tmp_path):
    """A cluster run killed before its teardown leaves, on each server, the processes its wrapper
    recorded (remote host shells, daemons, delayers); on a server that is this machine (localhost,
    as in these tests) `pdtb clean --prefix` stops them by their records, start times checked."""
    import sys

    from testbed.runner.cluster import REMOTE_REGISTRY, remote_record_argv

    registry = Path(REMOTE_REGISTRY.format(prefix=PREFIX))
    assert not registry.exists(), "a run of this prefix is up"
    proc = subprocess.Popen(remote_record_argv(PREFIX, ["sleep", "300"], "pkd0: sleep"), start_new_session=True)
    try:
        assert wait_for(lambda: registry.exists() and str(proc.pid) in registry.read_text())
        out = subprocess.run([sys.executable, "-m", "testbed.cli", "clean", "--prefix", PREFIX], capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stderr
        assert "cluster processes recorded on this machine: 1 signalled" in out.stdout, out.stdout
        assert proc.wait(timeout=10) == -signal.SIGTERM and not registry.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        registry.unlink(missing_ok=True)
        if registry.parent.exists() and not any(registry.parent.iterdir()):
            registry.parent.rmdir()


def test_tunnel_capacity_bounds_the_dilation():
    """A tunnel slower than the host lowers the rate cap, so the auto TDF rises with it."""
    from fabric.dilation import choose_emulation
    from fabric.topology import load_topology
    from testbed.runner.cluster import tunnel_bound

    topo = load_topology("pair")
    host = 8e9
    bound = tunnel_bound(spec(), {REMOTE: 400e6})
    assert bound is not None and bound[0] == 400e6 and "ssh tunnel to 127.0.0.2" in bound[1]
    free = choose_emulation(topo, "auto", 1.0, host_capacity=host)
    tunnelled = choose_emulation(topo, "auto", 1.0, host_capacity=min(host, bound[0]))
    assert tunnelled.tdf > free.tdf
    assert tunnel_bound(spec(tunnel_capacity="2Gbps"), {})[0] == 2e9
    assert tunnel_bound(spec(), {}) is None


def test_registry_and_protocol():
    from testbed.runner.backend import backend_class
    from testbed.runner.cluster import ClusterBackend

    cls = backend_class("mininet-cluster")
    assert cls is ClusterBackend and cls.live and cls.emulates_links
    assert cls.capacity_bound("pc", EmulationSpec.model_validate(
        {"backend": "mininet-cluster", "cluster": {"servers": ["localhost", REMOTE], "tunnel_capacity": "1Gbps"}}
    ))[0] == 1e9
    with pytest.raises(ConfigError, match="needs emulation.cluster.servers"):
        cls.capacity_bound("pc", EmulationSpec())


def test_vagrantfile_brings_up_n_vms_with_keys(repo):
    text = (repo / "Vagrantfile").read_text()
    assert 'ENV.fetch("PDTB_VMS"' in text and "authorized_keys" in text and "PermitTunnel" in text


# ------------------------------------------------------------------ two servers on one machine (root)
def _sshd_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "sudo", "mnexec", "iperf3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./bootstrap.sh installs openssh-server and sudo)"
    return None


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on a free port of 127.0.0.2 with its own host key, the test's client key
    authorized, tunnels permitted (testbed.runner.cluster.LoopbackServer); stopped by its PID."""
    why = _sshd_usable()
    if why:
        pytest.skip(why)
    from testbed.runner.cluster import LoopbackServer

    server = LoopbackServer(tmp_path_factory.mktemp("sshd"), REMOTE).start()
    (server.dir / "port").write_text(str(server.port))
    try:
        yield server.dir
    finally:
        server.stop()


@pytest.mark.root
def test_fabric_across_two_servers(sshd, tmp_path):
    """A two-host topology with d0 on the 'remote' server: its links are ssh tunnels, shaped at
    both ends, traffic flows, the fidelity monitor reads the remote namespace over ssh, and
    teardown leaves nothing on either server."""
    from fabric.check import measure_tcp
    from fabric.cleanup import our_links
    from fabric.topology import TopologyConfig
    from testbed.runner.cluster import REMOTE_REGISTRY, ClusterFabricNet, ClusterFidelityMonitor

    topo = TopologyConfig.model_validate({
        "name": "duo", "hosts": [{"name": "p0", "role": "prefill", "hardware": "trn2"},
                  {"name": "d0", "role": "decode", "hardware": "cs3"}],
        "switches": [{"name": "efa", "network": "efa"}, {"name": "fe", "network": "frontend"}],
        "links": [{"name": "p0-efa", "a": "p0", "b": "efa", "class": "efa", "params": {"bandwidth": "1Gbps"}},
                  {"name": "d0-efa", "a": "d0", "b": "efa", "class": "efa", "params": {"bandwidth": "200Mbps"}},
                  {"name": "p0-fe", "a": "p0", "b": "fe", "class": "frontend"},
                  {"name": "d0-fe", "a": "d0", "b": "fe", "class": "frontend"}]})
    cluster = ClusterSpec.model_validate({
        "servers": ["localhost", REMOTE], "placement": {"p0": "localhost", "d0": REMOTE},
        "identity_file": str(sshd / "id"), "known_hosts_file": str(sshd / "known_hosts"),
        "ssh_port": int((sshd / "port").read_text())})
    net = ClusterFabricNet(topo, cluster=cluster, prefix=PREFIX, subnets=SUBNETS, tdf=1.0)
    assert sorted(net.tunnel_links) == ["d0-efa", "d0-fe", "mgmt-d0"]  # every link of d0, mgmt included
    # started as under `nohup` (SIGHUP ignored, which children inherit): stop() must still end the
    # remote host's ssh client (it once hung here for ever, in Mininet's wait for the shell)
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        net.start()
        d0 = net.host_node("d0")
        assert d0.isRemote and d0.server == REMOTE
        # the tunnel end inside d0 is shaped like a veth end: HTB at the link's 200 Mbit/s
        qd = d0.cmd("tc -j qdisc show dev pkd0-e")
        assert '"htb"' in qd.replace(" ", ""), qd
        monitor = ClusterFidelityMonitor(net, tmp_path, 0.5).start()
        bps = measure_tcp(net, "p0", "d0", "efa", 2.0)
        verdict = monitor.stop()
        # HTB never sends more than the rate (+ one 1 ms burst); the ssh tunnel carries well over
        # 200 Mbit/s here, so a 2 s transfer lands between 50 % and 101 % of the configured rate
        assert 0.5 * 200e6 < bps < 1.01 * 200e6, bps
        assert "pkd0-e" in verdict["ports"], verdict["ports"].keys()  # sampled over ssh, remote netns
        assert sorted(verdict["tunnels"]["links"]) == ["d0-efa", "d0-fe", "mgmt-d0"]
        assert net.links_over(100e6, ("efa",)) == ["d0-efa"] and net.links_over(300e6, ("efa",)) == []
        # a runtime link change reshapes both tunnel ends; a link down cuts the tunnelled path
        net.set_link("d0-efa", bandwidth_bps=50e6)
        bps = measure_tcp(net, "p0", "d0", "efa", 2.0)
        assert 0.5 * 50e6 < bps < 1.01 * 50e6, bps  # the same HTB bound as above
        net.set_link("d0-efa", up=False)
        out = net.host_node("p0").cmd(f"ping -c 2 -W 1 {net.address('d0', 'efa')}")
        assert " 0 received" in out, out
        net.set_link("d0-efa", up=True)
        out = net.host_node("p0").cmd(f"ping -c 2 -W 2 {net.address('d0', 'efa')}")
        assert " 0 received" not in out, out
        remote_pids = Path(REMOTE_REGISTRY.format(prefix=PREFIX)).read_text().split("\n")
        assert any("shell pkd0" in line for line in remote_pids)
        # terminate() of a remote popen stops the process on its server, not just the ssh client
        sleeper = net.popen("d0", ["sleep", "300"])
        registry = Path(REMOTE_REGISTRY.format(prefix=PREFIX))
        deadline = time.monotonic() + 10
        while not any("pkd0: sleep" in line for line in registry.read_text().splitlines()):
            assert time.monotonic() < deadline, registry.read_text()
            time.sleep(0.05)
        pid = int(next(line for line in registry.read_text().splitlines() if "pkd0: sleep" in line).split()[0])
        assert Path(f"/proc/{pid}").exists()
        sleeper.terminate()
        sleeper.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
            assert time.monotonic() < deadline, f"remote sleep {pid} outlived terminate()"
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGHUP, hup)
        net.stop()
    assert our_links(PREFIX) == []
    assert not Path(REMOTE_REGISTRY.format(prefix=PREFIX)).exists()
    assert net.clean_reports and net.clean_reports[0]["left"] == []
    assert not any(name.startswith("tap4") for name in os.listdir("/sys/class/net"))
    assert json.loads(json.dumps(net.settings()["cluster"]))["placement"]["d0"] == REMOTE


CLUSTER_SCENARIO = """
name: mncluster
topology: pair
model: llama-3.1-8b
emulation:
  backend: mininet-cluster
  tdf: 20
  cluster:
    servers: [localhost, {remote}]
    placement: {{decode0: {remote}}}
    identity_file: {key}
    known_hosts_file: {known}
    ssh_port: {port}
workload:
  arrival: {{process: fixed, rate: 10}}
  requests: 6
  prompt_tokens: 1024
  output_tokens: 8
slo: {{ttft_ms: 1000, tpot_ms: 100}}
"""


@pytest.mark.root
@pytest.mark.timeout(540)   # run_pdtb's 420 s + its 60 s of teardown
def test_pdtb_run_on_two_servers(sshd, tmp_path):
    """`pdtb run` on the mininet-cluster backend, decode0 and its daemon on the second server:
    every request completes, the tunnel's measured capacity enters the choice of byte scale and
    the fidelity verdict, and nothing is left on either server."""
    from fabric.cleanup import our_links
    from testbed.runner.cluster import REMOTE_REGISTRY

    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER_SCENARIO.format(remote=REMOTE, key=sshd / "id", known=sshd / "known_hosts",
                                            port=(sshd / "port").read_text()))
    out = tmp_path / "run"
    # 133 s on an idle 2-core host (2026-12-07), over 150 s with a second suite beside it (each of
    # the 17 ssh tunnels took ~6 s to start), when pytest-timeout killed it and its leftovers failed
    # every later test that builds a net
    proc = run_pdtb(["run", str(path), "--out", str(out), "--json", "--prefix", PREFIX], 420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["counts"]["completed"] == summary["counts"]["total"] == 6, summary["counts"]
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "mininet-cluster"
    assert "tunnel to 127.0.0.2" in run["emulation_reason"], run["emulation_reason"]
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["tunnels"]["placement"]["decode0"] == REMOTE and fidelity["tunnels"]["capacity_bps"] > 0
    remote_rails = [port for port in fidelity["ports"] if port.startswith("pkdecode0-e")]
    assert len(remote_rails) == 12, sorted(fidelity["ports"])  # every rail's remote end, sampled over ssh
    assert our_links(PREFIX) == [] and not Path(REMOTE_REGISTRY.format(prefix=PREFIX)).exists()
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in left, [line for line in left.splitlines() if str(out) in line]


def test_gre_commands_pair_up_the_two_ends():
    from testbed.runner.cluster import ShapedGRELink, gre_commands, link_class

    a = gre_commands("pkd0-e", "10.0.0.1", "10.0.0.2", 7, "02:00:00:00:00:01")
    b = gre_commands("pkefa-2", "10.0.0.2", "10.0.0.1", 7, None)
    assert a[0] == ["ip", "link", "add", "name", "pkd0-e", "type", "gretap", "local", "10.0.0.1", "remote",
                    "10.0.0.2", "ttl", "64", "key", "7"]
    assert b[0][8:] == ["10.0.0.2", "remote", "10.0.0.1", "ttl", "64", "key", "7"]  # swapped, same key
    assert ["ip", "link", "set", "pkd0-e", "address", "02:00:00:00:00:01"] in a and len(b) == 2
    assert issubclass(link_class(spec(tunnel="gre")), ShapedGRELink)
