"""The topology files as Mininet ``Topo`` classes, for FabricNet and for ``mn --custom`` users.

    sudo .venv/bin/python /usr/bin/mn --custom fabric/topo.py --topo pdtb,pair,tdf=50 --controller none

(see docs/fabric.md). This module also holds the naming and address plan shared with
:class:`fabric.net.FabricNet`: node ``<prefix><name>``, host interfaces ``<node>-f|e|m``
(frontend, efa, mgmt), switch ports ``<switch node>-<port>``, root-namespace attachments
``<prefix>root-f|m``; every name fits Linux's 15 characters and starts with the prefix.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from mininet.node import Host, Node
from mininet.topo import Topo

try:
    from fabric.topology import (MAX_BRIDGE_PORTS, MAX_RAILS, RAIL_TAGS, LinkParams, RailLink, TopologyConfig,
                                 SwitchSpec, load_topology)
except ModuleNotFoundError:  # executed by ``mn --custom`` from a checkout: put the repo on the path
    sys.path.insert(0, str(Path(inspect.currentframe().f_code.co_filename).resolve().parent.parent))  # type: ignore[union-attr]
    from fabric.topology import (MAX_BRIDGE_PORTS, MAX_RAILS, RAIL_TAGS, LinkParams, RailLink, TopologyConfig,
                                 SwitchSpec, load_topology)

from fabric.link import FabricBridge, ShapedLink
from fabric.shaping import check_prefix, resolve_backend
from core.vocab import SCALED_NETWORKS

NET_TAGS = {"frontend": "f", "efa": "e", "mgmt": "m"}
DEFAULT_SUBNETS = {"frontend": "10.201.0.0/16", "efa": "10.202.0.0/16", "mgmt": "10.203.0.0/16"}
ROOT = "root"
MGMT_SWITCH = "mgmt"
HOST_OFFSET = 11
"""Host i (declaration order) gets the (11 + i)-th address of every network (of every rail's
subnet on efa); the root namespace the 1st."""
RAIL_SUBNET_BITS = 5
"""The efa subnet is split in 2**5 = 32 (MAX_RAILS) rail subnets: rail k of every host is in the
k-th (10.202.0.0/16 -> rail 0 10.202.0.0/21, rail 1 10.202.8.0/21, ...). A plain (one-rail)
efa link is rail 0. Separate subnets make each rail's route, source address and ARP its own."""
"""Only the EFA network carries byte-scaled payloads (KV caches); frontend and mgmt traffic is sent
at its real size, so only TDF dilates their rates."""


@dataclass(frozen=True)
class Dilation:
    """TDF and byte scale: emulated rate = rate x S / TDF (S on efa only); times x TDF."""

    tdf: float = 1.0
    byte_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.tdf >= 1.0:
            raise ValueError(f"tdf must be >= 1, got {self.tdf!r}")
        if not 0.0 < self.byte_scale <= 1.0:
            raise ValueError(f"byte_scale must be in (0, 1], got {self.byte_scale!r}")

    def rate(self, model_bps: float, network: str) -> float:
        scale = self.byte_scale if network in SCALED_NETWORKS else 1.0
        return model_bps * scale / self.tdf

    def time(self, model_s: float) -> float:
        return model_s * self.tdf

    def link(self, params: LinkParams, network: str) -> dict[str, Any]:  # noqa: D401
        """MODEL link parameters -> ShapedIntf keyword arguments (emulated, wall clock)."""
        bw = params.bandwidth_bps
        return {"rate_bps": None if bw is None else self.rate(bw, network),
                "latency_s": self.time(params.latency_s), "jitter_s": self.time(params.jitter_s),
                "loss": params.loss, "mtu": params.mtu, "queue_packets": params.queue_packets}


@dataclass
class Plan:
    """Names and addresses of one topology under one prefix."""

    topo: TopologyConfig
    prefix: str = "pt"
    subnets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SUBNETS))

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        self.subnets = {**DEFAULT_SUBNETS, **self.subnets}
        self.nets = {k: IPv4Network(v) for k, v in self.subnets.items()}
        self.implicit_mgmt = not any(lk.cls == "mgmt" for lk in self.topo.links)
        links: list[RailLink] = self.topo.rail_links()
        switches = list(self.topo.switches)
        if self.implicit_mgmt:
            switches.append(SwitchSpec(name=MGMT_SWITCH, network="mgmt"))
            links += [RailLink(f"mgmt-{h.name}", h.name, MGMT_SWITCH, "mgmt", LinkParams(), f"mgmt-{h.name}")
                      for h in self.topo.hosts]
        self.links = links
        self.switches = switches
        self.index = {h.name: i for i, h in enumerate(self.topo.hosts)}
        self.switch_names = {s.name for s in switches}
        efa = self.nets["efa"]
        if efa.prefixlen + RAIL_SUBNET_BITS > 30:
            raise ValueError(f"the efa subnet {efa} is too small to split in {MAX_RAILS} rail subnets")
        self.rail_nets = list(efa.subnets(prefixlen_diff=RAIL_SUBNET_BITS))
        if HOST_OFFSET + len(self.topo.hosts) >= self.rail_nets[0].num_addresses - 1:
            raise ValueError(f"the efa subnet {efa} leaves {self.rail_nets[0].num_addresses} addresses per rail, "
                             f"too few for {len(self.topo.hosts)} hosts")
        self.host_links: dict[tuple[str, str], list[RailLink]] = {}
        for lk in links:
            for end in (lk.a, lk.b):
                if end in self.index:
                    self.host_links.setdefault((end, lk.cls), []).append(lk)
        self.max_rails = {net: max((len(v) for (h, n), v in self.host_links.items() if n == net), default=0)
                          for net in self.nets}

    def node(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def rails(self, host: str, network: str = "efa") -> list[RailLink]:
        """``host``'s links on ``network``, in rail order (one for a plain link, none if absent)."""
        return self.host_links.get((host, network), [])

    def host_intf(self, host: str, network: str, rail: int = 0) -> str:
        """``<node>-e`` for a plain link, ``<node>-e<rail tag>`` for rail ``rail`` of a railed one."""
        links = self.rails(host, network)
        if links and links[0].railed:
            if not 0 <= rail < len(links):
                raise KeyError(f"host {host!r} has {len(links)} rails on {network}, no rail {rail}")
            return f"{self.node(host)}-{NET_TAGS[network]}{RAIL_TAGS[rail]}"
        return f"{self.node(host)}-{NET_TAGS[network]}"

    def link_intf(self, lk: RailLink, host: str) -> str:
        """The interface of emulated link ``lk`` at host end ``host``."""
        return self.host_intf(host, lk.cls, lk.rail)

    def root_intf(self, network: str) -> str:
        return f"{self.node(ROOT)}-{NET_TAGS[network]}"

    def address(self, host: str, network: str, rail: int = 0) -> str:
        """Host ``host``'s address on ``network`` (on efa: on rail ``rail``, in that rail's subnet)."""
        if network == "efa":
            return str(self.rail_nets[rail].network_address + HOST_OFFSET + self.index[host])
        return str(self.nets[network].network_address + HOST_OFFSET + self.index[host])

    def addresses(self, host: str, network: str = "efa") -> list[str]:
        """One address per rail of ``host`` on ``network``, in rail order."""
        return [self.address(host, network, lk.rail) for lk in self.rails(host, network)]

    def rail_subnet(self, rail: int) -> IPv4Network:
        return self.rail_nets[rail]

    def root_address(self, network: str) -> str:
        return str(self.nets[network].network_address + 1)

    def prefixlen(self, network: str) -> int:
        """Prefix length of a host's address on ``network`` (a rail subnet's on efa)."""
        return self.rail_nets[0].prefixlen if network == "efa" else self.nets[network].prefixlen

    def root_switch(self, network: str) -> str | None:
        """Where the root namespace joins ``network``: its first switch."""
        return next((s.name for s in self.switches if s.network == network), None)

    def is_host(self, name: str) -> bool:
        return name in self.index

    def host_of_address(self, address: str) -> str | None:
        for net, subnet in self.nets.items():
            if IPv4Address(address) in subnet:
                if net == "efa":
                    subnet = next(r for r in self.rail_nets if IPv4Address(address) in r)
                offset = int(IPv4Address(address)) - int(subnet.network_address) - HOST_OFFSET
                return self.topo.hosts[offset].name if 0 <= offset < len(self.topo.hosts) else None
        return None


class FabricTopo(Topo):
    """A topology file as a Mininet Topo: Linux bridges, :class:`ShapedLink` links with
    dilated parameters, addresses from the plan, and the root namespace on frontend and mgmt.

    With ``impairment="fallback"`` the links shape rates only; FabricNet adds loss and delay.
    """

    def build(self, topology: TopologyConfig | str = "pair", tdf: float = 1.0, byte_scale: float = 1.0,
              prefix: str = "pt", impairment: str = "auto", overrides: dict[str, LinkParams] | None = None,
              subnets: dict[str, str] | None = None, root_access: bool = True) -> None:
        topo = topology if isinstance(topology, TopologyConfig) else load_topology(topology)
        self.plan = Plan(topo, prefix, dict(subnets or {}))
        self.dilation = Dilation(float(tdf), float(byte_scale))
        self.backend = resolve_backend(impairment, prefix)
        overrides = overrides or {}
        known = {lk.name for lk in topo.links} | {lk.name for lk in self.plan.links}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"link overrides name unknown links {unknown}; links: {sorted(known)}")
        self.model_params = {lk.name: rail_params(lk, overrides.get(lk.group), overrides.get(lk.name))
                             for lk in self.plan.links}
        plan = self.plan
        for sw in plan.switch_names:
            count = sum(end == sw for lk in plan.links for end in (lk.a, lk.b))
            if count >= MAX_BRIDGE_PORTS:
                raise ValueError(f"switch {sw!r} has {count} ports: a Linux bridge takes at most {MAX_BRIDGE_PORTS}"
                                 " here (this topology is for the sim backend)")
        for h in topo.hosts:
            self.addHost(plan.node(h.name), cls=Host, ip=None)
        for i, s in enumerate(plan.switches):
            self.addSwitch(plan.node(s.name), cls=FabricBridge, dpid=f"{i + 1:016x}")
        ports: dict[str, int] = {}
        for lk in plan.links:
            ends = []
            for end in (lk.a, lk.b):
                if plan.is_host(end):
                    ends.append((plan.link_intf(lk, end),
                                 {"ip": f"{plan.address(end, lk.cls, lk.rail)}/{plan.prefixlen(lk.cls)}"}))
                else:
                    ports[end] = ports.get(end, 0) + 1
                    ends.append((f"{plan.node(end)}-{ports[end]}", {}))
            shape = self.dilation.link(self.model_params[lk.name], lk.cls)
            self.addLink(plan.node(lk.a), plan.node(lk.b), cls=ShapedLink, intfName1=ends[0][0],
                         intfName2=ends[1][0], params1=ends[0][1], params2=ends[1][1],
                         netem=self.backend == "netem", pdtb_link=lk.name, **shape)
        if root_access:
            self.addHost(plan.node(ROOT), cls=Node, inNamespace=False, ip=None)
            for net in ("frontend", "mgmt"):
                sw = plan.root_switch(net)
                if sw is None:
                    continue
                ports[sw] = ports.get(sw, 0) + 1
                mtu = max((self.model_params[lk.name].mtu for lk in plan.links if lk.cls == net), default=1500)
                self.addLink(plan.node(ROOT), plan.node(sw), cls=ShapedLink, intfName1=plan.root_intf(net),
                             intfName2=f"{plan.node(sw)}-{ports[sw]}", mtu=mtu,
                             params1={"ip": f"{plan.root_address(net)}/{plan.prefixlen(net)}"}, params2={})


def rail_params(lk: RailLink, group_override: LinkParams | None, rail_override: LinkParams | None) -> LinkParams:
    """MODEL parameters of one emulated link: its topology values, then an override of its
    declared link (whose ``bandwidth`` is the link's total, split over its rails), then one of
    this rail by name (per rail)."""
    params = lk.params
    if group_override is not None:
        params = params.merged(group_override)
        if "bandwidth_bps" in group_override.model_fields_set and group_override.bandwidth_bps and lk.railed:
            params = params.model_copy(update={"bandwidth_bps": group_override.bandwidth_bps / lk.rails})
    if rail_override is not None and lk.name != lk.group:
        params = params.merged(rail_override)
    return params


topos = {"pdtb": FabricTopo}
"""``mn --custom fabric/topo.py --topo pdtb,NAME[,tdf=..,byte_scale=..,prefix=..]``."""
