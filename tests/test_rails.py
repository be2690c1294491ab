"""Rails: a host link with several fabric interfaces. Schema (counts and rates from the hardware
profile or the topology, errors), emulated links, address plan and routes, dilation by the
busiest host, fabric-check route planning per rail, the sim's striped flows (no root needed)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError
from fabric.check import Probe, plan_routes, rail_batches
from fabric.dilation import carried_rate_bound_bps, choose_emulation
from fabric.topo import Plan, rail_params
from fabric.topology import LinkParams, load_topology
from sim.network import Port
from sim.run import kv_stripes

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

BASE = {
    "kind": "topology",
    "name": "t",
    "hosts": [{"name": "p0", "role": "prefill", "hardware": "trn2"},
              {"name": "d0", "role": "decode", "hardware": "cs3"},
              {"name": "r", "role": "router"}],
    "switches": [{"name": "efa", "network": "efa"}, {"name": "fe", "network": "frontend"}],
    "links": [
        {"name": "p0-efa", "a": "p0", "b": "efa", "class": "efa", "rails": "nics", "params": {"latency": "7.5us"}},
        {"name": "d0-efa", "a": "d0", "b": "efa", "class": "efa", "rails": 12, "params": {"latency": "7.5us"}},
        {"name": "p0-fe", "a": "p0", "b": "fe", "class": "frontend"},
        {"name": "d0-fe", "a": "d0", "b": "fe", "class": "frontend"},
        {"name": "r-fe", "a": "r", "b": "fe", "class": "frontend"},
    ],
}


def load(tmp_path: Path, data: dict):
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_topology(path)


def errors(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return str(info.value)


def test_rails_and_rates_from_the_hardware_profile(tmp_path: Path) -> None:
    topo = load(tmp_path, BASE)
    rails = topo.rail_links()
    p0 = [lk for lk in rails if lk.group == "p0-efa"]
    d0 = [lk for lk in rails if lk.group == "d0-efa"]
    assert len(p0) == 16 and len(d0) == 12                     # trn2 efa_nics; the topology's 12
    assert {lk.params.bandwidth_bps for lk in p0} == {200e9}   # 3.2 Tbit/s / 16 cards
    assert {lk.params.bandwidth_bps for lk in d0} == {100e9}   # 1.2 Tbit/s / 12 ports
    assert [lk.name for lk in d0[:2]] == ["d0-efa-r0", "d0-efa-r1"] and [lk.rail for lk in d0] == list(range(12))
    assert all(lk.params.latency_s == pytest.approx(7.5e-6) for lk in rails if lk.cls == "efa")
    assert topo.link_total_bps(topo.link("p0-efa")) == pytest.approx(3.2e12)
    assert topo.rails_of("p0") == 16 and topo.rails_of("r") == 0 and topo.rails_of("d0", "frontend") == 1
    # plain links stay one link under their own name
    assert [lk.name for lk in rails if lk.cls == "frontend"] == ["p0-fe", "d0-fe", "r-fe"]


def test_topology_bandwidth_is_the_total_split_over_the_rails(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["links"][1]["params"]["bandwidth"] = "2.4Tbps"       # e.g. two CS-3 systems' ports, fewer of them
    topo = load(tmp_path, data)
    assert {lk.params.bandwidth_bps for lk in topo.rail_links() if lk.group == "d0-efa"} == {200e9}
    # overrides: a declared link's bandwidth is its total, a rail's its own
    lk = next(r for r in topo.rail_links() if r.name == "d0-efa-r3")
    assert rail_params(lk, LinkParams.si(bandwidth_bps=1.2e12), None).bandwidth_bps == pytest.approx(100e9)
    assert rail_params(lk, LinkParams.si(loss=0.01), LinkParams.si(bandwidth_bps=5e9)).bandwidth_bps == 5e9
    assert rail_params(lk, LinkParams.si(loss=0.01), None).loss == 0.01


@pytest.mark.parametrize("change, message", [
    (lambda d: d["links"][2].update(rails=2), "rails are fabric interfaces of the efa network"),
    (lambda d: d["hosts"][0].update(hardware=None, role="router"), "neither end is a host with a 'hardware'"),
    (lambda d: d["links"][1].update(rails=33), "less than or equal to 32"),
    (lambda d: d["links"][1].update(rails="all"), "rails"),
    (lambda d: d["links"][0]["params"].update(bandwidth="1Tbps") or d["hosts"][0].update(hardware=None, role="router"),
     "'nics' takes the host's hardware profile efa_nics"),
])
def test_bad_rails_name_the_link(tmp_path: Path, change, message) -> None:
    data = copy.deepcopy(BASE)
    change(data)
    text = errors(tmp_path, data)
    assert message in text and "topo.yaml" in text, text


def test_switch_links_cannot_have_rails(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["switches"].append({"name": "efa2", "network": "efa"})
    data["links"].append({"name": "trunk", "a": "efa", "b": "efa2", "class": "efa", "rails": 2,
                          "params": {"bandwidth": "1Tbps"}})
    assert "cannot have rails" in errors(tmp_path, data)


def test_address_plan_gives_each_rail_its_subnet(tmp_path: Path) -> None:
    plan = Plan(load(tmp_path, BASE), "pa", {"efa": "10.232.0.0/16"})
    assert plan.addresses("d0") == [f"10.232.{8 * k}.12" for k in range(12)]
    assert plan.address("p0", "efa", 15) == "10.232.120.11" and plan.prefixlen("efa") == 21
    assert plan.host_intf("p0", "efa", 0) == "pap0-e0" and plan.host_intf("p0", "efa", 10) == "pap0-ea"
    assert plan.host_intf("p0", "frontend") == "pap0-f"
    assert plan.host_of_address("10.232.88.12") == "d0" and plan.max_rails["efa"] == 16
    for lk in plan.links:
        for end in (lk.a, lk.b):
            if plan.is_host(end):
                assert len(plan.link_intf(lk, end)) <= 15
    with pytest.raises(KeyError):
        plan.host_intf("d0", "efa", 12)
    # the shipped topologies: every interface name fits, every rail has an address
    for name in ("pair", "pod", "gpu-disagg"):
        shipped = Plan(load_topology(name), "pt")
        for h in shipped.topo.hosts:
            assert len(shipped.addresses(h.name)) == len(set(shipped.addresses(h.name))) == shipped.topo.rails_of(h.name)


def test_busiest_host_sets_the_dilation() -> None:
    pair = load_topology("pair")
    # the trn2's 16 rails carry at most what the CS-3's 12 take
    assert carried_rate_bound_bps(pair, pair.link("prefill0-efa")) == pytest.approx(1.2e12)
    c = choose_emulation(pair, 100, "auto", host_capacity=1e9)      # cap 500 Mbit/s
    per_rail = [lk.params.bandwidth_bps * c.byte_scale / c.tdf for lk in pair.rail_links() if lk.group == "decode0-efa"]
    assert sum(per_rail) == pytest.approx(500e6)                     # all 12 rails together at the cap


def test_fabric_check_covers_every_rail_and_batches_disjoint_ones() -> None:
    pair = load_topology("pair")
    routes = [r for r in plan_routes(pair) if r.cls == "efa"]
    covered = {name for r in routes for name in r.links}
    assert covered == {lk.name for lk in pair.rail_links() if lk.cls == "efa"}
    assert len(routes) == 16                       # one per trn2 rail, the CS-3's 12 rails within them
    probes = [Probe(r.src, r.dst, r.cls, list(r.links), 100, 0.1, 40e6, 0.005, 0.0, r.src_rail, r.dst_rail)
              for r in routes]
    batches = rail_batches(probes, cap_bps=500e6)
    assert sum(len(b) for b in batches) == 16
    for b in batches:
        links = [name for p in b for name in p.links]
        assert len(links) == len(set(links))          # a batch shares no link
        assert sum(p.rate_bps for p in b) <= 500e6    # and fits the host capacity


def test_sim_stripes_over_the_receivers_rails() -> None:
    up = [Port(f"p-r{k}:up", 200e9) for k in range(16)]
    down = [Port(f"d-r{k}:down", 100e9) for k in range(12)]
    stripes = kv_stripes(up, down)
    assert [s[0].name for s in stripes] == [f"p-r{k}:up" for k in range(12)]
    assert [s[1].name for s in stripes] == [f"d-r{k}:down" for k in range(12)]
    few = kv_stripes(up[:4], down)                  # 4 sender rails: stripe k leaves by rail k mod 4
    assert [s[0].name for s in few] == [f"p-r{k % 4}:up" for k in range(12)]
    assert kv_stripes([], down[:1]) == [(down[0],)] and kv_stripes(up[:1], []) == [(up[0],)]


def test_routes_per_rail_and_rto_min_per_route(tmp_path: Path) -> None:
    """The EFA routes a host gets (not applied: FabricNet is not started): each rail's subnet on
    its rail, the subnets it lacks on rail r mod n, a policy table per rail, and per peer a host
    route whose rto_min is 3 x that route's dilated round trip."""
    from fabric.net import FabricNet

    data = copy.deepcopy(BASE)
    data["hosts"].append({"name": "d1", "role": "decode", "hardware": "cs3"})
    data["links"].append({"name": "d1-efa", "a": "d1", "b": "efa", "class": "efa", "rails": 2,
                          "params": {"latency": "500us"}})             # a far decode host
    net = FabricNet(load(tmp_path, data), tdf=10, byte_scale=0.01, prefix="rz", root_access=False)
    lines = net.efa_route_lines("d0")
    # d0 has 12 rails: its own subnets, then rails 12..15 of the 16-rail p0 on rails 0..3
    assert "route replace 10.202.0.0/21 dev rzd0-e0 proto kernel scope link src 10.202.0.12" in lines[0]
    assert any(line.startswith("route replace 10.202.96.0/21 dev rzd0-e0 ") for line in lines)   # rail 12
    assert "rule add from 10.202.88.12 lookup 111 pref 111" in lines
    # the largest round trip (d0 <-> d1: 2 x 507.5 us x TDF 10 = 10.15 ms) sets the subnet routes: 31 ms
    assert net.rto_min_wall_s == pytest.approx(3 * 2 * 507.5e-6 * 10)
    assert "rto_min 31ms quickack 1" in lines[0]
    # d0 <-> p0 (2 x 15 us x 10 = 0.3 ms) is floored at 5 ms, on host routes to each p0 rail
    assert net.route_rto_min_wall_s("d0", "p0") == pytest.approx(0.005)
    host_routes = [line for line in lines if line.startswith("route replace 10.202.") and "/32" in line]
    assert len(host_routes) == 16 * (1 + 12) and all("rto_min 5ms quickack 1" in line for line in host_routes)
    assert net.efa_route_lines("r") == []                           # the router is not on efa
