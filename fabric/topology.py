"""Topology files: hosts with a role and hardware profile, switches, and links with parameters.

A topology describes the modelled system (rates of real EFA, real latencies); the fabric turns
these MODEL values into emulated ones with the run's time dilation and byte scale
(:func:`dilate`). Three networks are kept apart by link class: ``efa`` (KV handoff only),
``frontend`` (client <-> router <-> nodes, token streams) and ``mgmt`` (MQTT; unshaped).
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from core.config import ConfigError, NodeName, SafeName, StrictModel, load_model
from core.vocab import COMPUTE_ROLES, NETWORKS, LinkClass, Role
from core.units import Bandwidth, Duration, Ratio

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY_DIR = REPO_ROOT / "topologies"

RESERVED_NAMES = ("root", "mgmt")
"""Names the fabric uses itself: the root-namespace node and the implicit management switch."""
IFNAME_MAX = 15
"""Linux interface names: IFNAMSIZ (16) less the terminating NUL."""
PREFIX_MAX = 2
"""Longest name prefix (``fabric.shaping.check_prefix``): names are checked against it."""
MAX_BRIDGE_PORTS = 1023
"""Linux bridges take at most 1024 ports (BR_MAX_PORTS); one is kept for the root namespace."""
MAX_RAILS = 32
"""Most rails (fabric interfaces) one host link may have: p5.48xlarge's 32 EFA cards. Each rail
has its own subnet (the efa subnet split in 32) and a one-character tag in its interface name."""
RAIL_TAGS = "0123456789abcdefghijklmnopqrstuv"
"""Rail k's interface is ``<node>-e<RAIL_TAGS[k]>``: one character keeps 10-character host names
within 15 characters."""


def max_switch_ports(switch: str) -> int:
    """Ports a switch can have: its ports are named ``<prefix><switch>-<n>``, within 15 characters.
    (The emulation also refuses more than MAX_BRIDGE_PORTS; the sim backend has no bridges.)"""
    digits = IFNAME_MAX - PREFIX_MAX - len(switch) - 1
    return 10 ** max(0, digits) - 1


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
    rails: Annotated[int, Field(ge=1, le=MAX_RAILS)] | Literal["nics"] | None = None
    """EFA links only: the host end's fabric interfaces (NICs / ports), each its own shaped link
    to ``b`` (or ``a``) with its own address. ``nics``: the host's hardware profile ``efa_nics``.
    ``params.bandwidth`` is the link's total, split evenly over the rails; absent, each rail gets
    the profile's per-NIC rate (``efa_bandwidth / efa_nics``). None: one plain link."""

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass(frozen=True)
class RailLink:
    """One emulated link: a declared link, or one rail of a declared link with ``rails``.

    Has the fields of :class:`LinkSpec` that the fabric, the checks and the simulator read, so
    either can be passed where links are walked. ``name`` is the declared name for a plain
    link and ``<declared>-r<k>`` for rail k; ``params`` are per rail (bandwidth split)."""

    name: str
    a: str
    b: str
    cls: str
    params: LinkParams
    group: str
    rail: int = 0
    rails: int = 1

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a

    @property
    def railed(self) -> bool:
        """Whether this is one of several rails (interfaces tagged by rail) or a plain link."""
        return self.rails > 1 or self.name != self.group


def rail_link_name(group: str, rail: int) -> str:
    return f"{group}-r{rail}"


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
        problems += self._check_rails(host_names, switch_net, ports)
        for sw, count in ports.items():
            if count > max_switch_ports(sw):
                problems.append(f"switch {sw!r} has {count} ports (rails count one each); at most "
                                f"{max_switch_ports(sw)} (its port interfaces are named <prefix>{sw}-<n>)")
        if not problems:
            problems += self._check_networks(host_nets)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_rails(self, host_names: set[str], switch_net: dict[str, str], ports: dict[str, int]) -> list[str]:
        """Rails are on EFA links with a host end; their count, rate and interface names must resolve."""
        problems = []
        declared = {lk.name for lk in self.links}
        for i, link in enumerate(self.links):
            if link.rails is None:
                continue
            where = f"links[{i}] ({link.name}).rails"
            if link.cls != "efa":
                problems.append(f"{where}: rails are fabric interfaces of the efa network, not {link.cls}")
                continue
            if link.a not in host_names and link.b not in host_names:
                problems.append(f"{where}: a link between two switches cannot have rails (parallel bridge "
                                "links would loop): put rails on host links")
                continue
            try:
                n, per_rail = self._rail_shape(link)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            for k in range(n):
                if rail_link_name(link.name, k) in declared:
                    problems.append(f"{where}: rail link name {rail_link_name(link.name, k)!r} is also a declared link")
            for end in (link.a, link.b):
                if end in switch_net:
                    ports[end] += n - 1
                elif end in host_names and len(end) + PREFIX_MAX + 3 > IFNAME_MAX:
                    problems.append(f"{where}: host name {end!r} is too long for rail interfaces "
                                    f"(<prefix>{end}-e<rail> must fit {IFNAME_MAX} characters)")
        return problems

    def _rail_shape(self, link: LinkSpec) -> tuple[int, float | None]:
        """(rails, per-rail model bandwidth in bit/s or None) of a link with ``rails``; ValueError
        naming what is missing when neither the topology nor a hardware profile gives them."""
        hw_name = next((h.hardware for h in self.hosts if h.name in (link.a, link.b) and h.hardware), None)
        profile = None
        if hw_name is not None and (link.rails == "nics" or link.params.bandwidth_bps is None):
            from nodes.profiles import load_hardware

            try:
                profile = load_hardware(hw_name)
            except (ConfigError, OSError) as exc:
                raise ValueError(f"hardware profile {hw_name!r} of the link's host cannot be loaded ({exc})") from None
        if link.rails == "nics":
            if profile is None:
                raise ValueError("'nics' takes the host's hardware profile efa_nics, but neither end is a host "
                                 "with a 'hardware' profile: give a number")
            n = profile.efa_nics
            if n > MAX_RAILS:
                raise ValueError(f"hardware {hw_name!r} has {n} EFA NICs; at most {MAX_RAILS} rails")
        else:
            n = int(link.rails or 1)
        if link.params.bandwidth_bps is not None:
            return n, link.params.bandwidth_bps / n
        if profile is None:
            raise ValueError("the per-rail rate comes from the host's hardware profile (efa_bandwidth / efa_nics) "
                             "unless params.bandwidth gives the link's total: neither end is a host with a "
                             "'hardware' profile and params.bandwidth is absent")
        return n, profile.efa_bandwidth_bps / profile.efa_nics

    def rail_links(self) -> list[RailLink]:
        """The links the fabric emulates: plain links as declared, a link with ``rails`` as one
        link per rail (params per rail), in declaration order."""
        out: list[RailLink] = []
        for lk in self.links:
            if lk.rails is None:
                out.append(RailLink(lk.name, lk.a, lk.b, lk.cls, lk.params, lk.name))
                continue
            n, per_rail = self._rail_shape(lk)
            params = lk.params.model_copy(update={"bandwidth_bps": per_rail})
            out += [RailLink(rail_link_name(lk.name, k), lk.a, lk.b, lk.cls, params, lk.name, k, n) for k in range(n)]
        return out

    def link_total_bps(self, lk: LinkSpec) -> float | None:
        """A declared link's MODEL bandwidth, all its rails together (None: unshaped)."""
        if lk.rails is None:
            return lk.params.bandwidth_bps
        n, per_rail = self._rail_shape(lk)
        return None if per_rail is None else n * per_rail

    def fault_links(self, target: str) -> list[RailLink]:
        """The emulated links a link fault on ``target`` changes: every link of a class, or a
        declared link (all its rails)."""
        return [lk for lk in self.rail_links() if target in (lk.cls, lk.group)]

    def rail_link(self, name: str) -> RailLink:
        """An emulated link by name (a plain link's or a rail's ``<link>-r<k>``)."""
        for lk in self.rail_links():
            if lk.name == name:
                return lk
        raise KeyError(f"no link or rail {name!r} in topology {self.name!r}")

    def rails_of(self, host: str, cls: str = "efa") -> int:
        """How many interfaces ``host`` has on ``cls`` (0: not on it)."""
        lk = self.host_link(host, cls)
        if lk is None:
            return 0
        return 1 if lk.rails is None else self._rail_shape(lk)[0]

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
        """Declared links a packet from host ``src`` to host ``dst`` crosses on network ``cls``,
        in order. Raises KeyError when the two are not joined on that network."""
        return find_path(self.links, src, dst, cls, {h.name for h in self.hosts})

    def rail_path(self, src: str, dst: str, cls: str, src_rail: int = 0, dst_rail: int = 0) -> list[RailLink]:
        """Emulated links from rail ``src_rail`` of ``src`` to rail ``dst_rail`` of ``dst``."""
        hosts = {h.name for h in self.hosts}
        links = [lk for lk in self.rail_links() if lk.cls == cls
                 and not (src in (lk.a, lk.b) and lk.rail != src_rail)
                 and not (dst in (lk.a, lk.b) and lk.rail != dst_rail)]
        return find_path(links, src, dst, cls, hosts)


def find_path(links: list, src: str, dst: str, cls: str, hosts: set[str] | frozenset[str] = frozenset()) -> list:
    """Breadth-first path between two nodes (hosts or switches) over the links of one network.
    Hosts in ``hosts`` other than ``src`` are ends, never crossed: a host with several rails
    does not forward between them."""
    links = [lk for lk in links if lk.cls == cls]
    prev: dict[str, LinkSpec | None] = {src: None}
    todo = deque([src])
    while todo:
        node = todo.popleft()
        if node == dst:
            break
        if node != src and node in hosts:
            continue
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
