"""Topology files: hosts with a role and hardware profile, switches, and links with parameters.

A topology describes the modelled system (rates of real EFA, real latencies); the fabric turns
these MODEL values into emulated ones with the run's time dilation and byte scale
(:func:`dilate`). Three networks are kept apart by link class: ``efa`` (KV handoff only),
``frontend`` (client <-> router <-> nodes, token streams) and ``mgmt`` (MQTT; unshaped).
"""
from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict, Field, model_validator

from core.config import ConfigError, NodeName, SafeName, StrictModel, load_model
from core.vocab import COMPUTE_ROLES, NETWORKS, LinkClass, Role
from core.units import Bandwidth, Duration, Ratio

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_DIR = REPO_ROOT / "topologies"

RESERVED_NAMES = ("root", "mgmt")
"""Names the fabric uses itself: the root-namespace node and the implicit management switch."""
MAX_SWITCH_PORTS = 99
"""Switch-side interfaces are named ``<prefix><switch>-<port>``: two digits keep them <= 15 chars."""


class LinkParams(StrictModel):
    """Parameters of one link, in MODEL units (as in the modelled system, before dilation).

    Both directions of the link get the same parameters. ``bandwidth`` absent means unshaped.
    ``queue`` is the bottleneck queue in emulated packets (see docs/fabric.md).
    """

    model_config = ConfigDict(populate_by_name=True)

    bandwidth_bps: Bandwidth | None = Field(None, alias="bandwidth", gt=0)
    latency_s: Duration = Field(0.0, alias="latency", ge=0, le=10.0)
    jitter_s: Duration = Field(0.0, alias="jitter", ge=0, le=10.0)
    loss: Ratio = 0.0
    mtu: int = Field(1500, ge=576, le=65535)
    queue_packets: int = Field(1000, alias="queue", ge=1, le=1_000_000)

    @classmethod
    def si(cls, **values: float | int) -> LinkParams:
        """Build from SI numbers in code (``bandwidth_bps=1e9, latency_s=15e-6``), validated like a
        config; only the given fields count as set (for :meth:`merged`). Configs use units instead."""
        units = {"bandwidth_bps": "bps", "latency_s": "s", "jitter_s": "s"}
        data: dict[str, object] = {}
        for key, value in values.items():
            if key not in cls.model_fields:
                raise TypeError(f"LinkParams has no field {key!r}")
            if key in units and isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
                data[key] = f"{float(value)!r}{units[key]}"
            else:
                data[key] = value
        return cls.model_validate(data)

    def merged(self, override: LinkParams | None) -> LinkParams:
        """These parameters with the fields explicitly set in ``override`` replacing them."""
        if override is None:
            return self
        return self.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


class HostSpec(StrictModel):
    """One emulated machine: a network namespace running one daemon of ``role``."""

    name: NodeName
    role: Role
    hardware: SafeName | None = None

    @model_validator(mode="after")
    def _hardware_for_compute(self) -> HostSpec:
        if self.role in COMPUTE_ROLES and self.hardware is None:
            raise ValueError(f"host {self.name!r} has role {self.role!r}, which needs a 'hardware' profile name")
        return self


class SwitchSpec(StrictModel):
    """A Linux bridge on one network."""

    name: NodeName
    network: LinkClass


class LinkSpec(StrictModel):
    """A link between two nodes (host or switch) on the network named by ``class``."""

    model_config = ConfigDict(populate_by_name=True)

    name: SafeName
    a: NodeName
    b: NodeName
    cls: LinkClass = Field(alias="class")
    params: LinkParams = LinkParams()

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


class TopologyConfig(StrictModel):
    """A topology file (``kind: topology``)."""

    KIND: ClassVar[str] = "topology"

    name: SafeName
    description: str = ""
    hosts: list[HostSpec] = Field(min_length=1)
    switches: list[SwitchSpec] = []
    links: list[LinkSpec] = []

    @model_validator(mode="after")
    def _check_graph(self) -> TopologyConfig:
        problems: list[str] = []
        names = [h.name for h in self.hosts] + [s.name for s in self.switches]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                problems.append(f"node name {n!r} is used twice (host and switch names share one namespace)")
            if n in RESERVED_NAMES:
                problems.append(f"node name {n!r} is reserved by the fabric")
            seen.add(n)
        link_names: set[str] = set()
        switch_net = {s.name: s.network for s in self.switches}
        host_names = {h.name for h in self.hosts}
        host_nets: set[tuple[str, str]] = set()
        ports: dict[str, int] = defaultdict(int)
        for i, link in enumerate(self.links):
            where = f"links[{i}] ({link.name})"
            if link.name in link_names:
                problems.append(f"{where}: link name {link.name!r} is used twice")
            link_names.add(link.name)
            if link.a == link.b:
                problems.append(f"{where}: a link cannot join {link.a!r} to itself")
            for end in (link.a, link.b):
                if end not in seen:
                    problems.append(f"{where}: endpoint {end!r} is neither a host nor a switch")
                elif end in switch_net:
                    ports[end] += 1
                    if switch_net[end] != link.cls:
                        problems.append(f"{where}: class {link.cls!r} but switch {end!r} is on network "
                                        f"{switch_net[end]!r}")
                elif end in host_names:
                    if (end, link.cls) in host_nets:
                        problems.append(f"{where}: host {end!r} already has a {link.cls} link (one per network)")
                    host_nets.add((end, link.cls))
        for sw, count in ports.items():
            if count > MAX_SWITCH_PORTS:
                problems.append(f"switch {sw!r} has {count} links; at most {MAX_SWITCH_PORTS}")
        if not problems:
            problems += self._check_networks(host_nets)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_networks(self, host_nets: set[tuple[str, str]]) -> list[str]:
        problems = []
        mgmt_hosts = {h for h, net in host_nets if net == "mgmt"}
        if mgmt_hosts and len(mgmt_hosts) != len(self.hosts):
            missing = sorted({h.name for h in self.hosts} - mgmt_hosts)
            problems.append(f"mgmt links are declared but hosts {missing} have none: declare mgmt for every "
                            "host or for none (then every host joins an implicit unshaped mgmt switch)")
        if mgmt_hosts and not any(s.network == "mgmt" for s in self.switches):
            problems.append("declared mgmt links need a mgmt switch (the root namespace joins it there)")
        if not any(s.network == "frontend" for s in self.switches):
            problems.append("the frontend network needs a switch (the root namespace joins it there)")
        for net in NETWORKS:
            links = [lk for lk in self.links if lk.cls == net]
            nodes = {n for lk in links for n in (lk.a, lk.b)} | {s.name for s in self.switches if s.network == net}
            if not nodes:
                continue
            # a bridged network must be a tree: connected (one broadcast domain) and without loops
            if len(links) != len(nodes) - 1 or not _connected(nodes, links):
                problems.append(f"the {net} network must be a tree (connected, no loops): "
                                f"{len(nodes)} nodes joined by {len(links)} links")
        return problems

    # -- queries -------------------------------------------------------------------------------

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in topology {self.name!r}")

    def link(self, name: str) -> LinkSpec:
        for lk in self.links:
            if lk.name == name:
                return lk
        raise KeyError(f"no link {name!r} in topology {self.name!r}")

    def hosts_with_role(self, role: str) -> list[HostSpec]:
        return [h for h in self.hosts if h.role == role]

    def host_link(self, host: str, cls: str) -> LinkSpec | None:
        """The link joining ``host`` to network ``cls`` (None if it has none)."""
        for lk in self.links:
            if lk.cls == cls and host in (lk.a, lk.b) and host in {h.name for h in self.hosts}:
                return lk
        return None

    def path(self, src: str, dst: str, cls: str) -> list[LinkSpec]:
        """Links a packet from host ``src`` to host ``dst`` crosses on network ``cls``, in order.
        Raises KeyError when the two are not joined on that network."""
        return find_path(self.links, src, dst, cls)


def find_path(links: list[LinkSpec], src: str, dst: str, cls: str) -> list[LinkSpec]:
    """Breadth-first path between two nodes (hosts or switches) over the links of one network."""
    links = [lk for lk in links if lk.cls == cls]
    prev: dict[str, LinkSpec | None] = {src: None}
    todo = deque([src])
    while todo:
        node = todo.popleft()
        if node == dst:
            break
        for lk in links:
            if node in (lk.a, lk.b) and lk.other(node) not in prev:
                prev[lk.other(node)] = lk
                todo.append(lk.other(node))
    if dst not in prev:
        raise KeyError(f"{src!r} and {dst!r} are not joined on the {cls} network")
    out: list[LinkSpec] = []
    node = dst
    while (lk := prev[node]) is not None:
        out.append(lk)
        node = lk.other(node)
    return out[::-1]


def _connected(nodes: set[str], links: list[LinkSpec]) -> bool:
    start = next(iter(nodes))
    reached = {start}
    todo = [start]
    while todo:
        node = todo.pop()
        for lk in links:
            if node in (lk.a, lk.b) and lk.other(node) not in reached:
                reached.add(lk.other(node))
                todo.append(lk.other(node))
    return reached == nodes


def topology_names() -> list[str]:
    """Names of the shipped topologies (``topologies/*.yaml``)."""
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))


def resolve_topology(name_or_path: str | Path) -> Path:
    """A shipped topology's name (``pair``) -> its file; anything else is taken as a path."""
    text = str(name_or_path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        path = TOPOLOGY_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(text, [("", f"no shipped topology named {text!r}; known: {', '.join(topology_names())}"
                                      " (or give a path to a .yaml file)")])
        return path
    return Path(name_or_path)


def load_topology(name_or_path: str | Path) -> TopologyConfig:
    """Load and validate a topology by shipped name or path."""
    return load_model(TopologyConfig, resolve_topology(name_or_path))
