"""Topology files: schema, validation, paths, naming plan and dilation (no root needed)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fabric.topo import Dilation, Plan
from fabric.topology import LinkParams, load_topology, topology_names
from testbed.config.kinds import load_any
from core.config import ConfigError

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

BASE = {
    "kind": "topology",
    "name": "t",
    "hosts": [{"name": "p0", "role": "prefill", "hardware": "trn2"},
              {"name": "d0", "role": "decode", "hardware": "cs3"},
              {"name": "r", "role": "router"}],
    "switches": [{"name": "efa", "network": "efa"}, {"name": "fe", "network": "frontend"}],
    "links": [
        {"name": "p0-efa", "a": "p0", "b": "efa", "class": "efa", "params": {"bandwidth": "3.2Tbps", "latency": "7.5us"}},
        {"name": "d0-efa", "a": "d0", "b": "efa", "class": "efa", "params": {"bandwidth": "1.2Tbps", "latency": "7.5us",
                                                                          "loss": "1%", "mtu": 9001, "queue": 100}},
        {"name": "p0-fe", "a": "p0", "b": "fe", "class": "frontend"},
        {"name": "d0-fe", "a": "d0", "b": "fe", "class": "frontend"},
        {"name": "r-fe", "a": "r", "b": "fe", "class": "frontend"},
    ],
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def errors(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_topology(write(tmp_path, data))
    return str(info.value)


def test_shipped_topologies_load_and_fit_interface_names() -> None:
    assert {"pair", "pod", "gpu-colocated"} <= set(topology_names())
    for name in topology_names():
        topo = load_topology(name)
        plan = Plan(topo, "pt")
        for h in topo.hosts:
            for net in ("frontend", "efa", "mgmt"):
                assert len(plan.host_intf(h.name, net)) <= 15
        for s in plan.switches:
            assert len(f"{plan.node(s.name)}-99") <= 15
        kind, _ = load_any(Path(__file__).resolve().parent.parent / "topologies" / f"{name}.yaml")
        assert kind == "topology"


def test_pod_is_an_incast() -> None:
    pod = load_topology("pod")
    assert len(pod.hosts_with_role("prefill")) == 4 and len(pod.hosts_with_role("decode")) == 2
    assert len(pod.hosts_with_role("client")) == 2 and len(pod.hosts_with_role("router")) == 1
    trn2 = {pod.link_total_bps(pod.host_link(h.name, "efa")) for h in pod.hosts_with_role("prefill")}
    cs3 = {pod.link_total_bps(pod.host_link(h.name, "efa")) for h in pod.hosts_with_role("decode")}
    assert trn2 == {3.2e12} and cs3 == {1.2e12}
    assert {pod.rails_of(h.name) for h in pod.hosts_with_role("prefill")} == {16}
    assert {pod.rails_of(h.name) for h in pod.hosts_with_role("decode")} == {12}
    path = pod.path("prefill2", "decode1", "efa")
    assert [lk.name for lk in path] == ["prefill2-efa", "decode1-efa"]
    with pytest.raises(KeyError):
        pod.path("client0", "decode0", "efa")      # clients are not on the EFA network


def test_units_and_defaults(tmp_path: Path) -> None:
    topo = load_topology(write(tmp_path, BASE))
    d0 = topo.link("d0-efa").params
    assert d0.bandwidth_bps == 1.2e12 and d0.latency_s == pytest.approx(7.5e-6)
    assert d0.loss == pytest.approx(0.01) and d0.mtu == 9001 and d0.queue_packets == 100
    fe = topo.link("p0-fe").params
    assert fe.bandwidth_bps is None and fe.latency_s == 0 and fe.mtu == 1500


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["hosts"].append({"name": "p0", "role": "client"}), "used twice"),
    (lambda d: d["links"][0].update(b="nowhere"), "endpoint 'nowhere'"),
    (lambda d: d["hosts"][2].update(role="king"), "hosts[2].role"),
    (lambda d: d["hosts"][0].update(hardware="Trn2;rm -rf"), "hosts[0].hardware"),
    (lambda d: d["hosts"][0].pop("hardware"), "needs a 'hardware'"),
    (lambda d: d["hosts"][0].update(name="averyveryverylongname"), "hosts[0].name"),
    (lambda d: d["links"][0]["params"].update(bandwidth=400), "bare number"),
    (lambda d: d["links"][0]["params"].update(speed="1Gbps"), "unknown key"),
    (lambda d: d["links"][2].update({"class": "efa"}), "switch 'fe' is on network 'frontend'"),
    (lambda d: d["links"].append({"name": "p0-efa2", "a": "p0", "b": "efa", "class": "efa"}), "already has a efa link"),
    (lambda d: d["links"].append({"name": "p0-efa", "a": "r", "b": "efa", "class": "efa"}), "link name 'p0-efa' is used twice"),
    (lambda d: d["hosts"].append({"name": "root", "role": "client"}), "reserved"),
    (lambda d: d.update(switches=[{"name": "efa", "network": "efa"}], links=d["links"][:2]),
     "frontend network needs a switch"),
    (lambda d: (d["switches"].append({"name": "efa2", "network": "efa"}),
                d["links"].append({"name": "e1", "a": "efa", "b": "efa2", "class": "efa"}),
                d["links"].append({"name": "e2", "a": "efa2", "b": "efa", "class": "efa"})), "must be a tree"),
    (lambda d: d["switches"].append({"name": "lonely", "network": "efa"}), "must be a tree"),
    (lambda d: d["links"].append({"name": "p0-m", "a": "p0", "b": "fe", "class": "mgmt"}), "mgmt"),
])
def test_validation_errors_name_the_problem(tmp_path: Path, mutate, message: str) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    assert message in errors(tmp_path, data)


def test_load_by_unknown_name_lists_known() -> None:
    with pytest.raises(ConfigError, match="known: .*pair"):
        load_topology("no-such-topology")


def test_dilation_scales_efa_bytes_only() -> None:
    d = Dilation(tdf=50, byte_scale=1 / 64)
    p = LinkParams.si(bandwidth_bps=3.2e12, latency_s=15e-6, jitter_s=2e-6, loss=0.01)
    efa = d.link(p, "efa")
    assert efa["rate_bps"] == pytest.approx(1e9)            # the brief's example
    assert efa["latency_s"] == pytest.approx(0.75e-3) and efa["jitter_s"] == pytest.approx(1e-4)
    assert efa["loss"] == 0.01
    fe = d.link(p, "frontend")
    assert fe["rate_bps"] == pytest.approx(3.2e12 / 50)     # frontend payloads are not byte-scaled
    with pytest.raises(ValueError):
        Dilation(tdf=0.5)
    with pytest.raises(ValueError):
        Dilation(byte_scale=2)


def test_merged_takes_only_set_fields() -> None:
    base = LinkParams.si(bandwidth_bps=1e9, latency_s=1e-3, loss=0.02)
    merged = base.merged(LinkParams.si(latency_s=5e-3))
    assert merged.latency_s == 5e-3 and merged.bandwidth_bps == 1e9 and merged.loss == 0.02
    assert base.merged(None) is base
    with pytest.raises(TypeError):
        LinkParams.si(speed=1)


def test_plan_addresses_and_implicit_mgmt(tmp_path: Path) -> None:
    topo = load_topology(write(tmp_path, BASE))
    plan = Plan(topo, "pa", {"efa": "10.232.0.0/16"})
    assert plan.implicit_mgmt and plan.root_switch("mgmt") == "mgmt"
    assert {lk.name for lk in plan.links if lk.cls == "mgmt"} == {"mgmt-p0", "mgmt-d0", "mgmt-r"}
    assert plan.address("p0", "efa") == "10.232.0.11" and plan.address("d0", "frontend") == "10.201.0.12"
    assert plan.root_address("frontend") == "10.201.0.1"
    assert plan.host_of_address("10.232.0.12") == "d0"
    assert plan.host_intf("p0", "efa") == "pap0-e" and plan.node("fe") == "pafe"
    with pytest.raises(ValueError):
        Plan(topo, "toolong")


def _intf(netem: bool):
    from fabric.link import ShapedIntf
    intf = ShapedIntf.__new__(ShapedIntf)      # no node: only the command generation is tested
    intf.name, intf.mtu, intf.netem, intf.applied, intf.shape, intf.leaf = "pax-e", 9001, netem, False, {}, ""
    return intf


def test_tc_commands_any_rate_and_netem_leaf() -> None:
    cmds = _intf(netem=True).tc_commands(rate_bps=3.2e12, latency_s=375e-6, jitter_s=10e-6, loss=0.01,
                                         queue_packets=100)
    text = [" ".join(c) for c in cmds]
    assert text[0] == "tc qdisc add dev pax-e root handle 1: htb default 1"
    assert "rate 3200000000000bit ceil 3200000000000bit burst 400000000" in text[1]    # no 1000 Mbit/s cap
    assert "quantum 9015" in text[1]
    assert text[2].startswith("tc qdisc replace dev pax-e parent 1:1 handle 10: netem limit ")
    assert "delay 375.000us 10.000us rate" in text[2] and "loss random 1.000000%" in text[2]
    fallback = _intf(netem=False).tc_commands(rate_bps=1e7, latency_s=1e-3, jitter_s=0.0, loss=0.5,
                                              queue_packets=50)
    assert " ".join(fallback[-1]).endswith("parent 1:1 handle 10: pfifo limit 50")
    assert "burst 18030" in " ".join(fallback[1])            # at least two jumbo frames at low rates
    assert _intf(netem=False).tc_commands(rate_bps=None, latency_s=1.0, jitter_s=0.0, loss=0.1,
                                          queue_packets=10) == []
